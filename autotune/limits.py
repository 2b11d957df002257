"""Upper bounds on every size a user can give, in one table, checked before any work.

The bounds are generous for real clusters (a quarter of a million devices, models several
times the largest trained so far) and stop what is not a run at all: a billion micro-batches
would take minutes and gigabytes to generate before anything could say no. Every value object
(`ModelSpec`, `TrialConfig`), the search-space loader and the CLI read them from here, so a
bound is refused in milliseconds with the flag (or YAML key) and the bound named.

`MAX_SCHEDULE_CELLS` bounds pp x micro-batches, the size of a schedule's grid: every action of
every stage is generated, validated and replayed, so above it a schedule is too big to simulate
in seconds (a 64-stage, 1,000-micro-batch schedule, a 1T-parameter run's shape, is 64,000
cells and estimates in a few seconds). `MAX_SPACE_CELLS` bounds the cells of all the distinct
schedules a search space screens (each is compiled once).
"""

from __future__ import annotations

from autotune.errors import ConfigError

# field name (a config or model field; the CLI flag is the same with dashes) -> the largest value
BOUNDS: dict[str, int] = {
    "tp": 1_024,
    "pp": 1_024,
    "dp": 262_144,
    "world_size": 262_144,
    "micro_batch_size": 16_384,
    "num_microbatches": 65_536,
    "virtual_stages": 64,
    "global_batch_size": 16_777_216,
    "num_layers": 4_096,
    "hidden_size": 262_144,
    "num_heads": 16_384,
    "num_kv_heads": 16_384,
    "ffn_hidden_size": 1_048_576,
    "seq_len": 16_777_216,
    "vocab_size": 4_194_304,
    "steps": 10_000,  # measured steps of one trial
}
MAX_SCHEDULE_CELLS = 262_144  # pp x micro-batches of one configuration
MAX_SPACE_CELLS = 2_097_152  # pp x micro-batches summed over a space's distinct schedules
MAX_SPACE_COMBINATIONS = 200_000  # knob combinations a search space enumerates
MAX_SECONDS = 366 * 86_400  # any duration (a trial's timeout, a campaign's budget)
MAX_BYTES = 2**50  # any memory size (1 PiB)
MAX_PROFILE_SIZES = 64  # micro-batch sizes one profile measures
MAX_CPU_RANKS_PER_CORE = 16  # a CPU trial's ranks are processes on one machine
MAX_COUNT = 1_000_000  # any other count a user gives (trials, patience, seeds, concurrency)

WHAT = {
    "tp": "tensor-parallel degree",
    "pp": "pipeline stages",
    "dp": "data-parallel degree",
    "world_size": "devices (tp x pp x dp)",
    "micro_batch_size": "sequences per micro-batch",
    "num_microbatches": "micro-batches per step",
    "virtual_stages": "model chunks per rank",
    "global_batch_size": "sequences per step",
    "num_layers": "layers",
    "hidden_size": "hidden size",
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads",
    "ffn_hidden_size": "MLP width",
    "seq_len": "tokens per sequence",
    "vocab_size": "vocabulary entries",
    "steps": "measured steps",
}


def check_bound(name: str, value: int, field: str) -> None:
    """ConfigError naming `field` if `value` is above the bound of `name` (a BOUNDS key)."""
    most = BOUNDS[name]
    if value > most:
        raise ConfigError(field, f"at most {most:,} {WHAT[name]} (autotune's bound), got {value:,}")


def check_cells(pp: int, num_microbatches: int, field: str = "--num-microbatches") -> None:
    """A schedule of pp x micro-batches cells must be small enough to generate and simulate."""
    cells = pp * num_microbatches
    if cells > MAX_SCHEDULE_CELLS:
        raise ConfigError(
            field,
            f"the schedule would be too big to simulate: pp x micro-batches = {pp:,} x "
            f"{num_microbatches:,} = {cells:,} cells, above autotune's bound of {MAX_SCHEDULE_CELLS:,}",
        )


def check_space_cells(schedules: set[tuple[str, int, int]], field: str = "knobs") -> None:
    """The distinct (schedule, pp, micro-batches) a space screens must be few enough to compile."""
    cells = sum(p * m for _, p, m in schedules)
    if cells > MAX_SPACE_CELLS:
        raise ConfigError(
            field,
            f"screening would generate {len(schedules):,} distinct schedules of {cells:,} cells in all "
            f"(pp x micro-batches), above autotune's bound of {MAX_SPACE_CELLS:,}; narrow pp or the "
            "micro-batch sizes",
        )
