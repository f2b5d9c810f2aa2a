"""Realised against estimated alert precision over time, as Prometheus recorded the
service's gauges: the estimate (mean probability of the flagged rows) is there at once,
the realised figure once labels come back."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from ui import client


@st.cache_data(ttl=30, show_spinner=False)  # not two queries on every slider move
def _history(prometheus: str, hours: float) -> pd.DataFrame:
    return client.performance_history(prometheus, hours)


def render(prometheus: str, hours: float = 24) -> None:
    st.subheader("Performance in production")
    try:
        history = _history(prometheus, hours)
    except client.ServiceError as exc:
        st.info(f"{exc}. Start the stack with `make up`, or fix the Prometheus URL.")
        return
    if history.empty:
        st.info("Prometheus has no precision figures yet: score some transactions first.")
        return
    st.caption(
        f"Alert precision over the service's 1-day window, last {hours:g} hours. Estimated: "
        "the mean probability of the flagged transactions; realised: the share of labelled "
        "flagged transactions that were fraud."
    )
    chart = (
        alt.Chart(history)
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="time (UTC)"),
            y=alt.Y("precision:Q", title="alert precision", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("series:N", title=None),
            tooltip=["time:T", "series:N", alt.Tooltip("precision:Q", format=".3f")],
        )
    )
    st.altair_chart(chart, use_container_width=True)
