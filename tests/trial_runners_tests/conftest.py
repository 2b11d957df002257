"""Session fixtures: the pipeline runs are made once and shared by the tests that read them."""

from __future__ import annotations

import pytest

from tests.trial_runners_tests.pipeline_cases import Case, RunResult, matrix_cases, memory_cases, run_all


@pytest.fixture(scope="session")
def matrix_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, RunResult]:
    return run_all(matrix_cases(), tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="session")
def memory_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, RunResult]:
    return run_all(memory_cases(), tmp_path_factory.mktemp("memory"))
