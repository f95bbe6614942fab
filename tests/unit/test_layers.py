"""The shape of the code: imports point down (`cli` -> `jobs` -> `db`, `rules`), the
rules are pure, and the charges' pipeline is declared once (`jobs.pipeline`) and run by
every job that bills, none of which reads, computes or writes a chunk's charges itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "billing_jobs"

# What a rule may import: the standard library's pure parts, numpy and pandas, the other
# rules, and the validated settings (a value); no database, log, clock, file or process.
RULES_MAY_IMPORT = {
    "__future__",
    "calendar",
    "collections",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "numpy",
    "pandas",
    "re",
    "secrets",
    "typing",
    "zoneinfo",
    "billing_jobs.frames",
    "billing_jobs.rules",
    "billing_jobs.settings",
}
# The charges of a chunk are read, computed and written by the pipeline alone.
PIPELINE_ONLY = {"compute_chunk", "sync_charges", "write_drafts", "drafts_for"}
BILLING_JOBS = ("month_end", "nightly", "reconcile")


def _imports(path: Path) -> set[str]:
    """The modules a file imports (`from x import y` gives x and x.y), at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _allowed(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(f"{a}.") for a in allowed)


def _names_called(path: Path) -> set[str]:
    called: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            called.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        elif isinstance(node, ast.Name):
            called.add(node.id)  # passed on, e.g. partial(sync_charges, ...)
    return called


@pytest.mark.parametrize("path", sorted((PACKAGE / "rules").glob("*.py")), ids=lambda p: p.name)
def test_a_rule_imports_nothing_that_reads_writes_or_logs(path: Path) -> None:
    imported = {m for m in _imports(path) if not _allowed(m, RULES_MAY_IMPORT)}
    # `from billing_jobs.rules import x`, `from numpy import typing` and the like are allowed above
    assert not imported, f"{path.name} imports {sorted(imported)}"


@pytest.mark.parametrize("layer", ["db", "rules"])
def test_the_lower_layers_import_no_job_command_or_scheduler(layer: str) -> None:
    upward = ("billing_jobs.jobs", "billing_jobs.commands", "billing_jobs.cli", "billing_jobs.scheduler")
    for path in sorted((PACKAGE / layer).glob("*.py")):
        wrong = {m for m in _imports(path) if m.startswith(upward)}
        assert not wrong, f"{layer}/{path.name} imports {sorted(wrong)}"


@pytest.mark.parametrize("job", BILLING_JOBS)
def test_a_billing_job_runs_the_pipeline_and_computes_no_chunk_itself(job: str) -> None:
    path = PACKAGE / "jobs" / f"{job}.py"
    assert {"run_chunk", "ChunkJob"} <= _names_called(path), f"{job} does not run the pipeline"
    itself = PIPELINE_ONLY & _names_called(path)
    assert not itself, f"jobs/{job}.py calls {sorted(itself)}: a chunk's step outside the pipeline"
    jobs_imported = {m for m in _imports(path) if m.startswith("billing_jobs.jobs.")}
    assert not {m for m in jobs_imported if m.rsplit(".", 1)[-1] in PIPELINE_ONLY}


def test_the_pipeline_declares_each_step_once() -> None:
    path = PACKAGE / "jobs" / "pipeline.py"
    called = _names_called(path)
    assert called >= PIPELINE_ONLY, sorted(PIPELINE_ONLY - called)
    defined = [
        node.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in {"run_chunk", "_write_chunk"}
    ]
    assert sorted(defined) == ["_write_chunk", "run_chunk"]


@pytest.mark.parametrize("module", ["compute", "pipeline", "ledger"])
def test_the_chunks_of_charges_and_ledger_build_no_statement_themselves(module: str) -> None:
    """Their reads and writes are `db/`'s: of SQLAlchemy they hold connections only."""
    imported = {m for m in _imports(PACKAGE / "jobs" / f"{module}.py") if m.startswith("sqlalchemy.")}
    assert imported <= {"sqlalchemy.Connection", "sqlalchemy.Engine"}, sorted(imported)
