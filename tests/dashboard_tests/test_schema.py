"""The JSON API against its own OpenAPI schema, property-based (schemathesis): for requests the
schema allows (positive) and requests it forbids (negative), on every operation, no 500 and no
answer outside the schema (status, content type, body), a forbidden request refused with a 4xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from autotune.dashboard.app import create_app
from storage import Store
from tests.dashboard_tests.conftest import STUDY

OPERATIONS = 7  # contracts.md's five routes, the advice and the comparison


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_the_api_keeps_to_its_schema(seeded: Path, mode: GenerationMode) -> None:
    with Store(f"sqlite:///{seeded}", read_only=True) as store:
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_app(store))
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == OPERATIONS
        trial = store.trials(study=STUDY)[0].id
        statuses: dict[str, set[int]] = {}
        for op in operations:
            strategies = [op.as_strategy(generation_mode=mode)]
            if mode is GenerationMode.POSITIVE:
                # requests that name a real study or trial, so the answers carrying data are
                # checked too, not only the 404s of random names
                path = {"{name}": {"name": STUDY}, "{trial_id}": {"trial_id": trial}}
                known = next((v for k, v in path.items() if k in op.path), None)
                if known:
                    strategies.append(op.as_strategy(generation_mode=mode, path_parameters=known))
                if op.path == "/api/compare":
                    strategies.append(op.as_strategy(generation_mode=mode, query={"a": trial}))
            for strategy in strategies:
                try:
                    _run(strategy, statuses.setdefault(op.path, set()))
                except Unsatisfiable:  # nothing in the request can be wrong (no parameter, a name)
                    assert mode is GenerationMode.NEGATIVE, op.path
    if mode is GenerationMode.POSITIVE:  # the real names were answered with data
        assert all(200 in codes for codes in statuses.values()), statuses
    else:  # a trial id or a query parameter out of its range: refused, never a 500
        refused = {p: codes for p, codes in statuses.items() if codes}
        assert len(refused) >= 4 and all(c <= {404, 405, 422} for c in refused.values()), statuses


def _run(strategy: Any, seen: set[int]) -> None:
    """Every example of `strategy`, called and checked against the schema; the statuses seen."""

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case: Any) -> None:
        seen.add(case.call_and_validate().status_code)

    check()
