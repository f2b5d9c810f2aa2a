"""The analyst's review queue: the flagged transactions of the scored file, highest risk
first, each marked fraud or legitimate and sent to the service's /feedback as labels."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from serving.contract import ID_COLUMN
from ui import client

QUEUE_ROWS = 20  # what an analyst reviews at a sitting; the next ones follow once sent
VERDICTS = {"not reviewed": None, "fraud": True, "legitimate": False}


def queue(scored: pd.DataFrame, reviewed: set[str], rows: int = QUEUE_ROWS) -> pd.DataFrame:
    """The flagged rows not yet reviewed, highest probability first (ties in file order),
    each id once (a file's own ids may repeat across the chunks it was scored in)."""
    flagged = scored[scored["is_fraud"] & ~scored[ID_COLUMN].astype(str).isin(reviewed)]
    ordered = flagged.sort_values("fraud_probability", ascending=False, kind="stable")
    return ordered.drop_duplicates(ID_COLUMN).head(rows)


def verdicts(ids: list[str], chosen: dict[str, str]) -> list[dict]:
    """The labels to send: one per reviewed id, in queue order."""
    return [
        {ID_COLUMN: tid, "is_fraud": VERDICTS[chosen[tid]]}
        for tid in ids
        if VERDICTS.get(chosen.get(tid, "not reviewed")) is not None
    ]


def render(scored: pd.DataFrame, url: str, api_key: str | None, why: dict[str, str]) -> None:
    """The queue; `why` gives each explained row's reason codes as text."""
    st.subheader("Review queue")
    if said := st.session_state.pop("review_answer", None):  # the last send's outcome
        st.success(said)
    reviewed = st.session_state.setdefault("reviewed", set())  # sent in this session
    waiting = queue(scored, reviewed)
    if waiting.empty:
        st.info("No transaction left to review at this threshold.")
        return
    st.caption(
        f"The {len(waiting)} riskiest of {int(scored['is_fraud'].sum()):,} flagged transactions "
        f"not yet reviewed ({len(reviewed):,} sent). "
        "Mark each one you have checked; the verdicts go to the service as labels, which "
        "its realised precision and the next retraining use."
    )
    ids = waiting[ID_COLUMN].astype(str).tolist()
    with st.form("review"):
        for tid, row in zip(ids, waiting.itertuples(index=False), strict=True):
            left, right = st.columns([2, 3])
            left.markdown(
                f"`{tid}`  \np = **{row.fraud_probability:.4f}** ({row.risk_band}), "
                f"amount {row.Amount:,.2f}" + (f"  \n{why[tid]}" if tid in why else "")
            )
            right.radio("verdict", list(VERDICTS), key=f"verdict:{tid}", horizontal=True,
                        label_visibility="collapsed")  # fmt: skip
        sent = st.form_submit_button("Send verdicts")
    if sent:
        chosen = {tid: st.session_state.get(f"verdict:{tid}", "not reviewed") for tid in ids}
        labels = verdicts(ids, chosen)
        if said := _send(url, api_key, labels):
            reviewed.update(label[ID_COLUMN] for label in labels)
            st.session_state["review_answer"] = said
            st.rerun()  # the queue moves on to the rows not yet reviewed


def _send(url: str, api_key: str | None, labels: list[dict]) -> str | None:
    """Send the verdicts; what the service did with them, or None (said on the page)."""
    if not labels:
        st.warning("No verdict marked: nothing was sent.")
        return None
    try:
        answer = client.send_labels(url, labels, api_key)
    except client.ServiceError as exc:
        st.error(str(exc))
        return None
    unknown = answer.get("unknown_total", 0)
    return (
        f"Sent {len(labels)} verdict{'s' if len(labels) != 1 else ''}: {answer['stored']} new, "
        f"{answer['corrections']} corrections, {answer['unchanged']} unchanged"
        + (f"; {unknown} not in the decision log" if unknown else "")
        + "."
    )
