"""Why the risky rows were flagged: the service's reason codes of the file's riskiest
rows (the top of the risk table and the review queue), and a chart of the features that
drive them. Asked once per scored file and threshold (/explain logs no decision)."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from serving.contract import ID_COLUMN
from ui import client

EXPLAINED_ROWS = 200  # the riskiest rows explained: the risk table's and the queue's first


def riskiest(scored: pd.DataFrame, rows: int = EXPLAINED_ROWS) -> pd.DataFrame:
    """The highest-probability rows, each id once (ties in file order)."""
    ordered = scored.sort_values("fraud_probability", ascending=False, kind="stable")
    return ordered.drop_duplicates(ID_COLUMN).head(rows)


def reasons_of(scored: pd.DataFrame, url: str, api_key: str | None,
               features: list[str]) -> pd.DataFrame | None:  # fmt: skip
    """The reason codes of the riskiest rows (cached per file and service), or None after
    saying on the page why there are none."""
    rows = riskiest(scored)
    key = ("reasons", url, tuple(rows[ID_COLUMN].astype(str)))
    if st.session_state.get("reasons_key") != key:
        try:
            explained = client.explain(url, rows, features, api_key)
        except client.ServiceError as exc:
            st.warning(f"No reason codes: {exc}")
            return None
        st.session_state["reasons_key"], st.session_state["reasons"] = key, explained
    return st.session_state["reasons"]


def chart(explained: pd.DataFrame, flagged: set[str]) -> None:
    """What drives the flagged rows among those explained: how often each feature is one
    of a row's top reasons, coloured by its mean contribution."""
    mine = explained[explained[ID_COLUMN].astype(str).isin(flagged)]
    if mine.empty:
        return
    table = client.top_reasons(mine).head(12)
    st.markdown(f"**What drives the {len(mine):,} riskiest flagged transactions**")
    st.altair_chart(
        alt.Chart(table)
        .mark_bar()
        .encode(
            x=alt.X("rows:Q", title="flagged rows with it among their top reasons"),
            y=alt.Y("feature:N", sort="-x", title=None),
            color=alt.Color(
                "mean_contribution:Q",
                title="mean contribution",
                scale=alt.Scale(scheme="redblue", reverse=True, domainMid=0),
            ),
            tooltip=["feature", "rows", "mean_contribution"],
        ),  # fmt: skip
        use_container_width=True,
    )
