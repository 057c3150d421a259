"""What a run root and the install hold: `cad-ray status`, `cad-ray report`, `cad-ray judges`.
Libraries (torch, numpy, pandas, pyarrow, pydantic, Ray), and the modules of cad_ray that import them, are
imported inside the commands, lazy for start-up speed (`cad-ray --help` imports none of them)."""

from __future__ import annotations

import argparse

from cad_ray.errors import CadRayError
from cad_ray.judges import judge_listing


def cmd_status(args: argparse.Namespace) -> None:
    import pandas as pd

    from cad_ray.status import root_status

    table = root_status(args.root)

    def files(row) -> str:
        if pd.isna(row.done):
            return ""
        return f"{row.done}" if pd.isna(row.total) else f"{row.done} of {row.total}"

    shown = table.assign(files=[files(r) for r in table.itertuples()])[["stage", "complete", "files", "where"]]
    print(shown.to_string(index=False))
    unfinished = table[(table["stage"] != "report") & ~table["complete"]]["stage"].tolist()
    if unfinished:
        print(f"unfinished: {', '.join(unfinished)}; re-run the same command to finish: finished files are checked and kept, the rest is computed")


def cmd_report(args: argparse.Namespace) -> None:
    from cad_ray.stages.report import write_report
    from cad_ray.store import RunRoot
    from cad_ray.store.root import check_output

    if args.out:
        run = RunRoot(args.root)
        check_output(args.out, allowed=() if run.is_s3 else (run.join("report.html"),))
    try:
        where = write_report(args.root, args.out)
    except OSError as e:  # a full disk: the report is written to a temporary file first, removed on failure
        raise CadRayError(f"cannot write the report: {e.strerror or e}") from None
    print(f"report: {where}")


def cmd_judges(args: argparse.Namespace) -> None:
    spec = None
    if args.config:  # the judge a config names, with the options giving its weights: it can say "ready"
        from cad_ray.config import load_config

        spec = load_config(args.config).evaluation.judge
    # finds packages without importing them; no judge's code is loaded
    for line in judge_lines(judge_listing(spec)):
        print(line)


LISTING_WIDTH = 100  # `cad-ray judges` reads at 100 columns


def judge_lines(rows: list[tuple[str, str, str, str]], width: int = LISTING_WIDTH) -> list[str]:
    """One line per judge in aligned columns: name, status, needs, description. The needs column is as wide as its
    longest entry where the lines then fit in `width`, else narrower: a longer entry pushes only its own row's
    description to the right."""
    name_width = max(len(name) for name, *_ in rows)
    status_width = max(len(status) for _, status, *_ in rows)
    description_width = max(len(description) for *_, description in rows)
    room = width - name_width - status_width - description_width - 3 * 2
    needs_width = min(max(len(needs) for _, _, needs, _ in rows), max(room, 0))
    return [f"{name:<{name_width}}  {status:<{status_width}}  {needs:<{needs_width}}  {description}".rstrip()
            for name, status, needs, description in rows]
