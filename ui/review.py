"""The analyst's review queue: the flagged transactions of the scored file, highest risk
first, each marked fraud or legitimate and sent to the service's /feedback as labels."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from serving.contract import ID_COLUMN
from ui import client

QUEUE_ROWS = 20  # what an analyst reviews at a sitting; the rest waits for the next
VERDICTS = {"not reviewed": None, "fraud": True, "legitimate": False}


def queue(scored: pd.DataFrame, rows: int = QUEUE_ROWS) -> pd.DataFrame:
    """The flagged rows, highest probability first (ties in file order)."""
    flagged = scored[scored["is_fraud"]]
    return flagged.sort_values("fraud_probability", ascending=False, kind="stable").head(rows)


def verdicts(ids: list[str], chosen: dict[str, str]) -> list[dict]:
    """The labels to send: one per reviewed id, in queue order."""
    return [
        {ID_COLUMN: tid, "is_fraud": VERDICTS[chosen[tid]]}
        for tid in ids
        if VERDICTS.get(chosen.get(tid, "not reviewed")) is not None
    ]


def render(scored: pd.DataFrame, url: str, api_key: str | None) -> None:
    st.subheader("Review queue")
    waiting = queue(scored)
    if waiting.empty:
        st.info("No transaction is flagged at this threshold.")
        return
    st.caption(
        f"The {len(waiting)} riskiest of {int(scored['is_fraud'].sum()):,} flagged transactions. "
        "Mark each one you have checked; the verdicts go to the service as labels, which "
        "its realised precision and the next retraining use."
    )
    ids = waiting[ID_COLUMN].astype(str).tolist()
    with st.form("review"):
        for tid, row in zip(ids, waiting.itertuples(index=False), strict=True):
            left, right = st.columns([2, 3])
            left.markdown(
                f"`{tid}`  \np = **{row.fraud_probability:.4f}** ({row.risk_band}), "
                f"amount {row.Amount:,.2f}"
            )
            right.radio("verdict", list(VERDICTS), key=f"verdict:{tid}", horizontal=True,
                        label_visibility="collapsed")  # fmt: skip
        sent = st.form_submit_button("Send verdicts")
    if sent:
        chosen = {tid: st.session_state.get(f"verdict:{tid}", "not reviewed") for tid in ids}
        _send(url, api_key, verdicts(ids, chosen))


def _send(url: str, api_key: str | None, labels: list[dict]) -> None:
    if not labels:
        st.warning("No verdict marked: nothing was sent.")
        return
    try:
        answer = client.send_labels(url, labels, api_key)
    except client.ServiceError as exc:
        st.error(str(exc))
        return
    unknown = answer.get("unknown_total", 0)
    st.success(
        f"Sent {len(labels)} verdict{'s' if len(labels) != 1 else ''}: {answer['stored']} new, "
        f"{answer['corrections']} "
        f"corrections, {answer['unchanged']} unchanged"
        + (f"; {unknown} not in the decision log" if unknown else "")
        + "."
    )
