"""Renderers and round-trips for schedules: a text grid, a text form and CSV.

The grid has one column per stage and one row per program step, like PyTorch's
`_format_pipeline_order`; a failing step is marked `<-- ERROR HERE`.
"""

from __future__ import annotations

import csv
import io

from autotune.schedules.ir import Action, Schedule


def grid(
    programs: tuple[tuple[Action, ...], ...] | list[list[Action]],
    *,
    mark: tuple[int, int] | None = None,
    window: int | None = None,
) -> str:
    """Text grid of per-stage programs; `mark=(stage, step)` flags one cell.

    With `window`, only the rows within `window` steps of the mark are shown.
    """
    tokens = [[str(a) for a in p] for p in programs]
    rows = max((len(p) for p in tokens), default=0)
    lo, hi = 0, rows
    if mark is not None and window is not None:
        lo, hi = max(0, mark[1] - window), min(rows, mark[1] + window + 1)
    width = max([len(f"stage {len(tokens) - 1}")] + [len(t) + 2 for p in tokens for t in p]) + 2
    header = "step  " + "".join(f"{'stage ' + str(s):<{width}}" for s in range(len(tokens)))
    lines = [header.rstrip()]
    for step in range(lo, hi):
        cells = []
        for s, program in enumerate(tokens):
            text = program[step] if step < len(program) else ""
            if mark == (s, step):
                text = f"[{text}]"
            cells.append(text.ljust(width))
        line = f"{step:<6}" + "".join(cells)
        if mark is not None and mark[1] == step:
            line = line.rstrip() + f"   <-- ERROR HERE (stage {mark[0]})"
        lines.append(line.rstrip())
    return "\n".join(lines)


def to_text(schedule: Schedule) -> str:
    """One header line, then one line per stage: `stage 0: F0 SF0 F1 ...`."""
    partner = ",".join("-" if x is None else str(x) for x in schedule.partner)
    head = (
        f"schedule {schedule.name} stages={schedule.num_stages} "
        f"microbatches={schedule.num_microbatches} cap={schedule.cap or '-'} partner={partner}"
        + (f" chunks={schedule.virtual_stages}" if schedule.virtual_stages > 1 else "")
    )
    body = [f"stage {s}: " + " ".join(str(a) for a in prog) for s, prog in enumerate(schedule.programs)]
    return "\n".join([head, *body]) + "\n"


def from_text(text: str) -> Schedule:
    """Parse `to_text` output back into a Schedule (raises ValueError with the line)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("schedule "):
        raise ValueError("schedule text must start with a 'schedule NAME ...' header line")
    fields = dict(part.split("=", 1) for part in lines[0].split()[2:])
    name = lines[0].split()[1]
    p, m = int(fields["stages"]), int(fields["microbatches"])
    cap = None if fields["cap"] == "-" else int(fields["cap"])
    partner = tuple(None if x == "-" else int(x) for x in fields["partner"].split(","))
    programs: list[tuple[Action, ...]] = []
    for n, line in enumerate(lines[1:], start=2):
        label, _, rest = line.partition(":")
        if label.strip() != f"stage {len(programs)}":
            raise ValueError(f"line {n}: expected 'stage {len(programs)}: ...', got {line[:40]!r}")
        programs.append(tuple(Action.parse(tok) for tok in rest.split()))
    if len(programs) != p:
        raise ValueError(f"header says {p} stages but {len(programs)} stage lines follow")
    return Schedule(
        name=name, num_stages=p, num_microbatches=m, programs=tuple(programs), partner=partner, cap=cap,
        virtual_stages=int(fields.get("chunks", 1)),
    )  # fmt: skip


def to_csv(schedule: Schedule) -> str:
    """Rows of `stage,step,action` (the golden-file form tests compare against)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stage", "step", "action"])
    for s, prog in enumerate(schedule.programs):
        for i, action in enumerate(prog):
            writer.writerow([s, i, str(action)])
    return buf.getvalue()


def programs_from_csv(text: str) -> list[list[Action]]:
    """Per-stage programs from `to_csv` rows."""
    reader = csv.DictReader(io.StringIO(text))
    programs: dict[int, list[tuple[int, Action]]] = {}
    for row in reader:
        programs.setdefault(int(row["stage"]), []).append((int(row["step"]), Action.parse(row["action"])))
    return [[a for _, a in sorted(programs[s])] for s in sorted(programs)]
