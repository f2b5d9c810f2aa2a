"""export-labels: the decision log's labelled decisions into data/raw/feedback/.

Not a DVC stage: the decision log is outside the pipeline (the service writes it), so
its export is a step a person runs (`make export-labels`, which then `dvc add`s the
folder); prepare reads the folder with data.feedback: true. The database is the one the
service uses: FRAUD_DECISIONS_URL, else the SQLite file in the service's data directory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sqlalchemy import exc, inspect
from sqlalchemy.engine import make_url

from serving.decisions import LABELS, engine_for, first_line
from serving.settings import Settings
from stages.lib import feedback
from stages.lib.project import setup_logging, stage_timer

log = logging.getLogger("fraudops.export_labels")


def database_url() -> str:
    """The decision log's URL as the service resolves it; SystemExit if there is none."""
    url = Settings().decision_log_url()
    if url is None:
        raise SystemExit("export-labels: FRAUD_DECISIONS_URL is 'off': there is no decision log")
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise SystemExit(f"export-labels: no decision log at {shown} (has the service run?)")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    out = parser.parse_args().out
    setup_logging()
    url = database_url()
    shown = make_url(url).render_as_string(hide_password=True)
    with stage_timer("export-labels"):
        try:
            engine = engine_for(url)
            if not inspect(engine).has_table(LABELS.name):
                raise SystemExit(f"export-labels: {shown} has no decision log tables")
            before, after = feedback.export(engine, out)
        except (exc.SQLAlchemyError, OSError) as error:  # one line, not a traceback
            raise SystemExit(f"export-labels: {shown}: {first_line(error)}") from None
    log.info("%s: %d labelled decisions (%d before this export) from %s",
             out / feedback.FILE_NAME, after, before, shown)  # fmt: skip


if __name__ == "__main__":
    main()
