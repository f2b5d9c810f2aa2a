"""fraudops batch scoring UI: upload transactions, score them with the service, explore
the results at any threshold, download them, review the flagged ones (verdicts go back as
labels), and follow realised against estimated precision. Talks to the service (and to
Prometheus, for the history) over HTTP only.

    streamlit run ui/app.py   (FRAUD_SERVICE_URL, FRAUD_API_KEY, FRAUD_PROMETHEUS_URL)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from serving.contract import ID_COLUMN
from ui import client, performance, reasons, review

SAMPLE = Path(__file__).resolve().parent / "sample_transactions.csv"
TOP_N = 20

st.set_page_config(page_title="fraudops: batch scoring", page_icon=":credit_card:", layout="wide")

# Sidebar: where the service is, whether it answers, and what model it serves.
with st.sidebar:
    st.header("Service")
    url = st.text_input("Service URL", os.environ.get("FRAUD_SERVICE_URL", "http://127.0.0.1:3000"))
    url = url.rstrip("/")
    api_key = (
        st.text_input(
            "API key (if the service needs one)",
            os.environ.get("FRAUD_API_KEY", ""),
            type="password",
        )
        or None
    )
    prometheus = st.text_input(
        "Prometheus URL (performance history)",
        os.environ.get("FRAUD_PROMETHEUS_URL", "http://127.0.0.1:9090"),
    ).rstrip("/")
    contract = None
    if client.is_ready(url):
        try:
            contract = client.fetch_contract(url, api_key)
        except client.ServiceError as exc:
            st.error(str(exc))
    if contract:
        lineage = contract.lineage
        st.success("Service is up")
        st.markdown(
            f"**Model** `{lineage.registered_model}` champion `{contract.model_tag}`  \n"
            f"family `{lineage.model_family}`, model md5 `{lineage.model_md5[:12]}`  \n"
            f"training data md5 `{lineage.train_data_md5[:12]}`  \n"
            f"[Model card]({url}/model-card?format=md): data, metrics with intervals, "
            "calibration, limits"
        )
        threshold = st.slider(
            "Decision threshold",
            0.0,
            1.0,
            contract.threshold,
            step=0.0005,
            format="%.4f",
            help="Defaults to the cost-based threshold chosen in training.",
        )
        costs = contract.costs
        st.caption(
            f"Costs from the model's contract: missed fraud EUR "
            f"{costs.cost_missed_fraud:g}, false alarm EUR {costs.cost_false_alarm:g}."
        )
    else:
        st.error(
            f"The scoring service at {url} is down or unreachable. Start it with "
            "`make serve`, or fix the URL."
        )

st.title("Card fraud batch scoring")
st.write(
    "Upload transactions in the `creditcard.csv` format (CSV or Parquet, up to the full "
    "284,807 rows) and score them with the model in service."
)

left, right = st.columns([3, 1])
with left:
    upload = st.file_uploader("Transactions file", type=["csv", "parquet", "pq"])
with right:
    st.write("")
    use_sample = st.button("Try a sample", help="1,000 built-in synthetic transactions")

if use_sample:
    st.session_state["source"] = ("sample_transactions.csv", SAMPLE.read_bytes())
    st.session_state.pop("result", None)
elif upload is not None and st.session_state.get("source", ("",))[0] != upload.name:
    st.session_state["source"] = (upload.name, upload.getvalue())
    st.session_state.pop("result", None)

source = st.session_state.get("source")
if source and contract:
    name, data = source
    try:
        frame = client.read_file(name, data)
    except Exception:  # a file pandas cannot read at all: say so, no traceback
        st.error(f"{name} is not a readable CSV or Parquet file.")
        st.stop()
    problems = client.check_against_contract(frame, contract)
    st.write(f"**{name}**: {len(frame):,} rows, {frame.shape[1]} columns.")
    if problems:
        st.error(
            "This file does not match the model's contract, so it was not sent:\n\n"
            + "\n".join(f"- {p}" for p in problems)
        )
        st.stop()
    if st.button("Score", type="primary") or use_sample:
        bar = st.progress(0.0, text="Scoring...")

        def show(done: int, total: int, seconds: float) -> None:
            bar.progress(
                done / total,
                text=f"Scored {done:,} of {total:,} rows ({done / max(seconds, 1e-9):,.0f} rows/s)",
            )

        run = client.score_in_chunks(frame, url, contract, api_key, progress=show)
        st.session_state["result"] = (name, frame, run)

result = st.session_state.get("result")
if result and contract:
    name, frame, run = result
    if run.error:
        st.error(
            run.error
            + (
                f" The {run.rows_done:,} rows scored before it are kept below."
                if run.rows_done
                else ""
            )
        )
    if run.rows_done:
        # The service's ids first (the file's own, or the ones it assigned), then the rows.
        rows = frame.iloc[: run.rows_done].reset_index(drop=True)
        scored = pd.concat(
            [run.result[[ID_COLUMN]], rows.drop(columns=ID_COLUMN, errors="ignore"),
             run.result.drop(columns=ID_COLUMN)], axis=1,
        )  # fmt: skip
        probabilities = scored["fraud_probability"].to_numpy()
        scored["is_fraud"] = probabilities >= threshold
        labels = scored["Class"].to_numpy() if "Class" in scored.columns else None
        summary = client.threshold_summary(probabilities, threshold, contract.costs, labels)
        rate = run.rows_done / max(run.seconds, 1e-9)
        st.subheader("Results")
        cols = st.columns(5)
        cols[0].metric("Rows scored", f"{summary['rows']:,}", help=f"{rate:,.0f} rows/s")
        cols[1].metric("Flagged", f"{summary['flagged']:,}")
        cols[2].metric("Flagged share", f"{summary['flagged_share']:.2%}")
        cost_label = "Cost at threshold" if labels is not None else "Expected cost"
        cols[3].metric(cost_label, f"EUR {summary['expected_cost']:,.0f}")
        if labels is not None:
            cols[4].metric(
                "Precision / recall", f"{summary['precision']:.2f} / {summary['recall']:.2f}"
            )
        else:
            cols[4].metric("Threshold", f"{threshold:.4f}")

        chart_col, pr_col = st.columns(2)
        with chart_col:
            st.markdown("**Fraud probability (log scale)**")
            edges = np.r_[0, np.logspace(-5, 0, 21)]
            counts = np.histogram(np.clip(probabilities, 0, 1), bins=edges)[0]
            hist = pd.DataFrame(
                {"from": np.maximum(edges[:-1], 1e-5), "to": edges[1:], "transactions": counts}
            )
            # Rectangles from 0 to the count: a ranged x with a lone y would draw lines.
            chart = (
                alt.Chart(hist[hist["transactions"] > 0])
                .mark_rect(color="#1f77b4", stroke="white", strokeWidth=0.5)
                .encode(
                    x=alt.X("from:Q", scale=alt.Scale(type="log"), title="fraud probability"),
                    x2="to:Q",
                    y=alt.Y(
                        "transactions:Q",
                        scale=alt.Scale(type="symlog"),
                        title="transactions (symlog)",
                    ),
                    y2=alt.datum(0),
                    tooltip=["from", "to", "transactions"],
                )
            )
            rule = (
                alt.Chart(pd.DataFrame({"t": [max(threshold, 1e-5)]}))
                .mark_rule(color="red")
                .encode(x="t:Q")
            )
            st.altair_chart(chart + rule, use_container_width=True)
        with pr_col:
            if labels is not None and 0 < labels.sum() < len(labels):
                st.markdown("**Precision-recall (file has Class)**")
                curve = client.pr_curve(probabilities, labels)
                st.altair_chart(
                    alt.Chart(curve)
                    .mark_line()
                    .encode(x=alt.X("recall:Q"), y=alt.Y("precision:Q")),
                    use_container_width=True,
                )
            else:
                st.info("Add a Class column to the file to see precision and recall.")

        explained = reasons.reasons_of(scored, url, api_key, contract.feature_names)
        why = {} if explained is None else dict(zip(explained[ID_COLUMN], explained["text"],
                                                     strict=True))  # fmt: skip
        st.markdown(f"**Top {TOP_N} riskiest transactions**")
        top = reasons.riskiest(scored, TOP_N).assign(
            reasons=lambda t: t[ID_COLUMN].astype(str).map(why)
        )
        first = [ID_COLUMN, "fraud_probability", "risk_band", "is_fraud", "reasons", "Time",
                 "Amount"] + (["Class"] if labels is not None else [])  # fmt: skip
        st.dataframe(
            top[first + [c for c in top.columns if c not in first]], use_container_width=True,
            column_config={"reasons": st.column_config.TextColumn(
                "reasons", help="features by contribution to the score: value (contribution)",
                width="large")},
        )  # fmt: skip
        if explained is not None:
            reasons.chart(explained, set(scored.loc[scored["is_fraud"], ID_COLUMN].astype(str)))

        stem = Path(name).stem
        parquet = io.BytesIO()
        scored.to_parquet(parquet, index=False)
        d1, d2 = st.columns(2)
        d1.download_button(
            "Download CSV",
            scored.to_csv(index=False).encode(),
            file_name=f"{stem}_scored.csv",
            mime="text/csv",
        )
        d2.download_button(
            "Download Parquet",
            parquet.getvalue(),
            file_name=f"{stem}_scored.parquet",
            mime="application/vnd.apache.parquet",
        )
        review.render(scored, url, api_key, why)

performance.render(prometheus)
