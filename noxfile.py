"""Developer sessions: tests, lint, typecheck, bench.

``python3 dev.py test`` is the one-command way to run the tests on a fresh machine;
these sessions are for day-to-day work and CI.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against real Postgres (and Redis where reachable)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "polyqueue", "tests", "benchmarks", "examples", "noxfile.py", "dev.py")
    session.run("ruff", "format", "--check", "polyqueue", "tests", "benchmarks", "examples", "noxfile.py", "dev.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the tests; import-linter on the layers."""
    session.install("-e", ".[dev]")
    session.run("mypy", "-p", "polyqueue")
    session.run("mypy", "--strict", "tests")
    session.run("lint-imports")


#: e2e and latency through each broker after the full run on the default backend, sized to what
#: its local stand-in serves here (benchmarks/brokers.py): moto and the Service Bus test peer are slow.
BROKER_BENCH = {
    "memory": [],
    "redis": [],
    "pgmq": [],
    "azure_service_bus": ["--jobs", "5000", "--rate", "50"],
    "sqs": ["--jobs", "1000", "--rate", "10"],
}


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: enqueue rate, end-to-end throughput, pickup latency percentiles, every broker.

    With arguments after --, one run of ``python -m benchmarks`` with them instead.
    """
    session.install("-e", ".[dev]")
    if session.posargs:
        session.run("python", "-m", "benchmarks", *session.posargs)
        return
    session.run("python", "-m", "benchmarks")
    for backend, options in BROKER_BENCH.items():
        only = ["--only", "e2e,latency", "--e2e-stats", "analysed"]
        session.run("python", "-m", "benchmarks", "--backend", backend, *only, *options)


@nox.session
def chaos(session: nox.Session) -> None:
    """Fault injection for every broker; pass runner options after --, e.g. -- --jobs 100000."""
    session.install("-e", ".[dev]")
    brokers = ["direct", "memory", "redis", "pgmq", "sqs", "azure_service_bus"]
    extra = list(session.posargs)
    if "--broker" in extra:
        brokers = [extra[extra.index("--broker") + 1]]
        del extra[extra.index("--broker") : extra.index("--broker") + 2]
    for broker in brokers:
        session.run("python", "-m", "tests.chaos.runner", "--broker", broker, *extra)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs + mkdocstrings); warnings and broken links fail the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)
