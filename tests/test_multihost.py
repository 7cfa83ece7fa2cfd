"""Many hosts on one study (issue #25, item 1): workers in network namespaces ("hosts", tests/multihost.py) with
private /tmp, home and cache, sharing only PostgreSQL (through a forwarder on the bridge) and an S3 store (moto's
server on the bridge). Hosts crash (kill -9 of every worker of a host), a host's link is cut past the heartbeat
grace period and restored, PostgreSQL restarts, a host's disk (its /tmp, home and cache) is full; the study still
ends right:

- its count of finished trials (+ at most workers-1 that were already running), unique numbers, nothing RUNNING
  or WAITING, every FAIL retried exactly once and that retry finished;
- every trial interrupted by a crash or a cut is FAIL, and its one retry ran on another host and resumed from the
  dead trial's checkpoint in the shared store (``resumed_after_epoch``, after >= 1 epoch), with the dead trial's
  reported values and none missing;
- the cut host's late writes are refused (its workers say so in one line and go on) without a traceback;
- no checkpoint is left in the store (a finished trial's checkpoint is removed);
- the full-disk host still trains and finishes trials; no worker prints a traceback.

A crash is a whole host: killing one worker of a host with two would let its sibling take the retry, which says
nothing about the shared store. The crashed host comes back (its workers start again) once the retries of its
trials run elsewhere; a cut host's link comes back once its trials' retries run elsewhere (and the cut lasted past
the grace period). Hosts are interrupted only when each of their workers runs a trial that has a checkpoint in the
store and is not itself a retry (checked with the host's workers stopped), so every interrupted trial must resume.

Which host ran a trial is the user attr ``multihost_host`` that the test's worker wrapper sets (hpsearch records
no host name on a trial). Each variant runs once per module (a module-scoped fixture) and several tests check its
outcome, including two bugs this harness found (LateWriteTraceback, HeartbeatThreadDied: see their checks). The
short variant (2 hosts x 1 worker, 8 trials, a cut, a crash, one host's disk full: about a
minute) runs in CI; the full one (4 hosts x 2 workers, 60 trials, crashes for 90 s, a cut, a PostgreSQL restart, one
host's disk full: about 4 minutes) is slow. Skipped, saying why, where namespaces cannot be made (not root, no
ip/unshare, no netns) or PostgreSQL is not running.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGCONT, SIGSTOP

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpsearch import artifacts
from tests.chaos_worker import PID_ATTR
from tests.conftest import ONE_CONFIG_SPACE, study_text
from tests.multihost import BUCKET, HOST_ATTR, Cluster, Host, why_no_namespaces
from tests.test_services import pg_database

STUDY = "multihost"
PREFIX = "runs/multihost"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = Path(__file__).with_name("multihost.py")
# One configuration, nothing pruned: every trial trains all its epochs (tests/test_chaos.py).
SPACE = ONE_CONFIG_SPACE.replace("batch_size = 32", "batch_size = 64") + "fc_width = 16\n"
TAKEN_OVER = "warning: this worker's trial was failed as stale while the database was out of reach"


@dataclass(frozen=True)
class Plan:
    hosts: int
    workers_per_host: int
    n_trials: int
    crashes: int  # at most this many host crashes ...
    min_crashes: int  # ... and at least this many, or the run proved nothing
    crash_every: float  # seconds between crashes
    crash_for: float  # seconds after the first crash during which hosts crash
    interrupt_below: int  # hosts are crashed or cut only while fewer trials than this have finished
    cut_seconds: float = 0  # a link cut lasting at least this long (0: none), after ...
    cut_after_crashes: int = 0  # ... this many crashes
    restart_postgresql: bool = False  # once, after the first interruption ...
    outage_seconds: float = 3  # ... which the hosts see last this long (longer than a heartbeat, as on a busy server)
    disk_full_host: int | None = None  # this host's /tmp (home, cache) is a full 4 MiB tmpfs
    epochs: int = 3
    epoch_seconds: float = 1.0
    heartbeat: int = 1
    grace: int = 4
    timeout: float = 300

    @property
    def workers(self) -> int:
        return self.hosts * self.workers_per_host


SHORT = Plan(hosts=2, workers_per_host=1, n_trials=8, crashes=1, min_crashes=1, crash_every=0, crash_for=60,
             interrupt_below=6, cut_seconds=8, cut_after_crashes=0, disk_full_host=1, timeout=240)
FULL = Plan(hosts=4, workers_per_host=2, n_trials=60, crashes=12, min_crashes=4, crash_every=3, crash_for=90,
            interrupt_below=40, cut_seconds=10, cut_after_crashes=2, restart_postgresql=True, disk_full_host=3,
            epochs=4, epoch_seconds=1.5, grace=5, timeout=900)


@dataclass
class Interruption:
    kind: str  # "crash" | "cut"
    host: str
    before: FrozenTrial  # the trial as it was when its host was interrupted


@dataclass
class Run:
    """What a run did; the end state is read into ``trials`` and ``leftovers`` before the services go."""

    plan: Plan
    cluster: Cluster
    logs: dict[int, Path] = field(default_factory=dict)  # worker pid -> its log
    host_of: dict[int, str] = field(default_factory=dict)  # worker pid -> host name
    killed: set[int] = field(default_factory=set)  # pids
    interrupted: dict[int, Interruption] = field(default_factory=dict)  # trial number -> what happened
    cut_host: str | None = None
    events: list[str] = field(default_factory=list)  # what happened when, for the failure messages and the report
    started: float = field(default_factory=time.monotonic)
    error: str | None = None  # run_plan's failure
    trials: list[FrozenTrial] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # checkpoint keys left in the store
    seconds: float = 0.0

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {text}")

    def tail(self) -> str:
        return "\n".join(f"--- {self.host_of[pid]} pid {pid} ({log.name})\n" + log.read_text()[-1500:]
                         for pid, log in self.logs.items()) + "\n--- events\n" + "\n".join(self.events)


def start_worker(run: Run, host: Host, url: str, tmp_path: Path) -> None:
    plan = run.plan
    log = tmp_path / f"{host.name}-{len(run.logs)}.log"
    env = {"HPSEARCH_HEARTBEAT_SECONDS": str(plan.heartbeat), "HPSEARCH_GRACE_SECONDS": str(plan.grace),
           "CHAOS_EPOCH_SECONDS": str(plan.epoch_seconds)}
    proc = host.spawn([sys.executable, str(WORKER), "hpsearch", "worker", STUDY, "--storage", url, "--threads", "1",
                       "--no-artifacts", "--no-summary"], log, env=env,
                      disk_full=host.index == plan.disk_full_host)
    run.logs[proc.pid] = log
    run.host_of[proc.pid] = host.name


def create_study(plan: Plan, url: str, cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study, made from the test process (as `hpsearch create` would), its store recorded on it: the workers join
    by name and find the store there."""
    from hpsearch.spec import load_spec
    from hpsearch.storage import open_storage
    from hpsearch.study import open_study

    path = tmp_path / "multihost.toml"
    path.write_text(study_text(STUDY, epochs=plan.epochs, n_trials=plan.n_trials, extra='pruner = "none"',
                               space=SPACE))
    for key, value in cluster.s3_env().items():
        monkeypatch.setenv(key, value)
    storage = open_storage(url)
    try:
        study = open_study(load_spec(path), storage)
        artifacts.resolve_location(study, f"s3://{BUCKET}/{PREFIX}", "unused")
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _has_checkpoint(cluster: Cluster, trial: FrozenTrial) -> bool:
    key = trial.user_attrs.get(artifacts.CHECKPOINT_ATTR)
    if key is None:
        return False
    try:
        cluster.s3_client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
    except Exception:  # botocore's ClientError (404)
        return False
    return True


def running_on(host: Host, trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Live worker pid -> the trial it runs (as the database has it); a worker with none is left out."""
    live = {p.pid for p in host.live()}
    return {t.user_attrs[PID_ATTR]: t for t in trials
            if t.state == TrialState.RUNNING and t.user_attrs.get(HOST_ATTR) == host.name
            and t.user_attrs.get(PID_ATTR) in live}


def heartbeat_ages(reader: optuna.storages.RDBStorage, trials: list[FrozenTrial]) -> dict[int, float]:
    """Trial id -> seconds since its last heartbeat, by the database's clock (trials without one left out)."""
    beats = sqlalchemy.table("trial_heartbeats", sqlalchemy.column("trial_id"), sqlalchemy.column("heartbeat"))
    age = sqlalchemy.func.extract("epoch", sqlalchemy.func.now() - beats.c.heartbeat)
    with reader.engine.connect() as con:
        rows = con.execute(sqlalchemy.select(beats.c.trial_id, age)
                           .where(beats.c.trial_id.in_([t._trial_id for t in trials]))).all()
    return {int(trial_id): float(seconds) for trial_id, seconds in rows}


def interruptible(run: Run, host: Host, trials: list[FrozenTrial],
                  reader: optuna.storages.RDBStorage) -> list[FrozenTrial] | None:
    """The trials an interruption of ``host`` would hit, when every one of its workers runs a trial that is not a
    retry, has reported an epoch (not its last), has its checkpoint in the store and a fresh heartbeat; else None.
    (A trial whose worker lost the database while storing it stays RUNNING, left to its heartbeat, which has stopped:
    its worker has moved on, so an interruption would not hit it.)"""
    live = host.live()
    running = running_on(host, trials)
    if not live or len(running) != len(live):
        return None
    for t in running.values():
        if t.system_attrs.get("retry_history") or not 1 <= len(t.intermediate_values) < run.plan.epochs:
            return None
    ages = heartbeat_ages(reader, list(running.values()))
    if any(ages.get(t._trial_id, float("inf")) > run.plan.grace / 2 for t in running.values()):
        return None
    if not all(_has_checkpoint(run.cluster, t) for t in running.values()):
        return None
    return list(running.values())


def retries_elsewhere(run: Run, host: str, trials: list[FrozenTrial]) -> bool:
    """Whether every trial interrupted on ``host`` has a retry that runs (or ran) on another host."""
    for number, what in run.interrupted.items():
        if what.host != host:
            continue
        retries = [t for t in trials if number in t.system_attrs.get("retry_history", [])]
        if not any(t.state != TrialState.WAITING and t.user_attrs.get(HOST_ATTR) != host for t in retries):
            return False
    return True


def try_interrupt(run: Run, host: Host, kind: str, reader: optuna.storages.RDBStorage) -> bool:
    """Crashes or cuts ``host`` when it is interruptible; its workers are stopped (SIGSTOP) while that is decided, so
    none starts or ends a trial between the check and the interruption."""
    host.signal(SIGSTOP)
    try:
        trials = optuna.load_study(study_name=STUDY, storage=reader).get_trials()
        hit = interruptible(run, host, trials, reader)
        if hit is None:
            return False
        if kind == "crash":
            for p in host.live():
                p.kill()
                p.wait()
                run.killed.add(p.pid)
        else:
            host.cut()
            run.cut_host = host.name
        for t in hit:
            run.interrupted[t.number] = Interruption(kind, host.name, t)
        run.event(f"{kind} {host.name}: trials {sorted(t.number for t in hit)} "
                  f"(epochs {[len(t.intermediate_values) for t in hit]})")
        return True
    finally:
        host.signal(SIGCONT)


def run_plan(run: Run, url: str, local_url: str, tmp_path: Path) -> None:
    """Starts the workers and interrupts hosts as ``run.plan`` says until every worker has ended; raises
    AssertionError when a worker failed, the run took too long or too few interruptions happened."""
    plan, cluster = run.plan, run.cluster
    for host in cluster.hosts:
        for _ in range(plan.workers_per_host):
            start_worker(run, host, url, tmp_path)
    reader = optuna.storages.RDBStorage(local_url, engine_kwargs={"pool_pre_ping": True})
    deadline = time.monotonic() + plan.timeout
    crashes = 0
    first_crash = next_crash = None
    cut_since: float | None = None
    down: set[str] = set()  # crashed hosts, until they start again
    restarted = not plan.restart_postgresql
    calm_from = 0.0  # no interruption before (time.monotonic())
    try:
        while any(h.live() for h in cluster.hosts) or down:
            assert time.monotonic() < deadline, f"the run did not end in {plan.timeout} s\n{run.tail()}"
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name=STUDY, storage=reader).get_trials()
            except Exception:  # the server is restarting
                continue
            now = time.monotonic()
            finished = sum(t.state in FINISHED for t in trials)
            for host in cluster.hosts:
                if host.name in down and (retries_elsewhere(run, host.name, trials) or finished >= plan.n_trials):
                    down.discard(host.name)
                    if finished < plan.n_trials:
                        run.event(f"{host.name} starts again")
                        for _ in range(plan.workers_per_host):
                            start_worker(run, host, url, tmp_path)
                if host.is_cut and now - cut_since >= plan.cut_seconds and retries_elsewhere(run, host.name, trials):
                    host.restore()
                    run.event(f"{host.name}'s link restored")
            if not restarted and run.interrupted and not any(h.is_cut for h in cluster.hosts):
                run.event("PostgreSQL restarts")
                began = time.monotonic()
                cluster.database_outage(True)
                try:
                    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"],
                                   check=True, timeout=120, capture_output=True)
                    time.sleep(max(0.0, plan.outage_seconds - (time.monotonic() - began)))
                finally:
                    cluster.database_outage(False)
                run.event("PostgreSQL is back")
                restarted = True
                calm_from = time.monotonic() + plan.grace  # the trials the restart left behind go stale meanwhile
                continue
            if finished >= plan.interrupt_below or now < calm_from:
                continue
            # Another host must go on running trials: the one that fails the interrupted trials and runs their retries.
            up = [h for h in cluster.hosts if h.name not in down and not h.is_cut and h.live()]
            busy = [h for h in up if running_on(h, trials)]
            if len(busy) < 2:
                continue
            if plan.cut_seconds and run.cut_host is None and crashes >= plan.cut_after_crashes:
                for host in busy:
                    if try_interrupt(run, host, "cut", reader):
                        cut_since = time.monotonic()
                        break
                continue
            crash_window = (first_crash is None or now - first_crash < plan.crash_for) and crashes < plan.crashes
            if crash_window and (next_crash is None or now >= next_crash):
                for host in busy:
                    if try_interrupt(run, host, "crash", reader):
                        down.add(host.name)
                        crashes += 1
                        first_crash = first_crash or now
                        next_crash = now + plan.crash_every
                        break
    finally:
        for host in cluster.hosts:
            if host.is_cut:
                host.restore()
            for p in host.live():
                p.kill()
                p.wait()
        reader.remove_session()
        reader.engine.dispose()
    run.event("all workers ended")
    failed = {p.pid: p.returncode for h in cluster.hosts for p in h.procs
              if p.pid not in run.killed and p.returncode != 0}
    assert not failed, f"workers failed: {failed}\n{run.tail()}"
    assert crashes >= plan.min_crashes, f"only {crashes} crashes happened\n{run.tail()}"
    assert restarted, run.tail()
    if plan.cut_seconds:
        assert run.cut_host is not None, f"no host could be cut\n{run.tail()}"




def play(plan: Plan, workdir: Path) -> Run:
    """Runs ``plan`` on a cluster made for it and torn down after it (also when it fails), with the end state read."""
    why = why_no_namespaces()
    if why is not None:
        pytest.skip(why)
    pytest.importorskip("boto3", reason="needs the s3 extra: pip install 'hpsearch[s3]'")
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    if plan.restart_postgresql and shutil.which("pg_ctlcluster") is None:
        pytest.skip("pg_ctlcluster is not installed: cannot restart the server")
    with pg_database() as local_url, Cluster(plan.hosts, workdir) as cluster, pytest.MonkeyPatch.context() as mp:
        create_study(plan, local_url, cluster, workdir, mp)
        run = Run(plan, cluster)
        try:
            run_plan(run, cluster.database_url(local_url), local_url, workdir)
        except AssertionError as e:
            run.error = str(e)
        run.seconds = time.monotonic() - run.started
        run.trials = optuna.load_study(study_name=STUDY, storage=local_url).get_trials()
        listing = cluster.s3_client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/checkpoints/")
        run.leftovers = [o["Key"] for o in listing.get("Contents", [])]
    failed = {t.number for t in run.trials if t.state == TrialState.FAIL}
    print(f"\n{plan}: {run.seconds:.0f} s, {len(run.trials)} trials, "
          f"{sum(t.state in FINISHED for t in run.trials)} finished, FAIL {sorted(failed)}, interrupted "
          f"{sorted(run.interrupted)}, FAIL not interrupted {sorted(failed - set(run.interrupted))}\n"
          + "\n".join(run.events))
    return run


def describe(run: Run) -> str:
    return "\n".join(f"trial {t.number}: {t.state.name} host={t.user_attrs.get(HOST_ATTR)} "
                     f"pid={t.user_attrs.get(PID_ATTR)} epochs={len(t.intermediate_values)} "
                     f"retry_history={t.system_attrs.get('retry_history')} "
                     f"resumed_after_epoch={t.user_attrs.get('resumed_after_epoch')}" for t in run.trials) + \
        f"\ninterrupted: {sorted(run.interrupted)}\n--- events\n" + "\n".join(run.events)


def check_end_state(run: Run) -> None:
    assert run.error is None, run.error
    plan, trials = run.plan, run.trials
    states = describe(run)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"duplicated trial numbers\n{states}"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states
    finished = sum(t.state in FINISHED for t in trials)
    assert plan.n_trials <= finished <= plan.n_trials + plan.workers - 1, states
    retries_of: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        for number in t.system_attrs.get("retry_history", []):
            retries_of.setdefault(number, []).append(t)
    # Every FAIL was retried exactly once, and its chain ended in a finished trial.
    for t in trials:
        if t.state == TrialState.FAIL:
            chain = retries_of.get(t.number, [])
            assert len([r for r in chain if r.system_attrs["retry_history"][-1] == t.number]) == 1, (t.number, states)
            assert any(r.state in FINISHED for r in chain), (t.number, states)
    # Every interrupted trial: FAIL, its one retry on another host, resumed from the shared store after >= 1 epoch.
    for number, what in run.interrupted.items():
        dead = trials[number]
        assert dead.state == TrialState.FAIL, (number, states)
        [retry] = retries_of[number]
        assert retry.state in FINISHED, (number, states)
        assert retry.user_attrs[HOST_ATTR] != what.host, (number, what.host, states)
        assert retry.params == dead.params
        assert retry.user_attrs.get("resumed_after_epoch", -1) >= 0, (number, retry.number, states)
        reported = [dead.intermediate_values[e] for e in sorted(dead.intermediate_values)]
        assert len(reported) >= len(what.before.intermediate_values) >= 1
        assert retry.user_attrs["val_accuracy"][:len(reported)] == reported, (number, retry.number, states)
        assert sorted(retry.intermediate_values) == list(range(plan.epochs)), (number, retry.number, states)
    # A finished trial's checkpoint is removed: none is left, not even one a cut host wrote late.
    assert run.leftovers == [], states
    if plan.disk_full_host is not None:  # a host without a byte of local disk still trains and finishes trials
        name = f"host{plan.disk_full_host}"
        assert [t for t in trials if t.user_attrs.get(HOST_ATTR) == name and t.state in FINISHED], states


class KnownBug(AssertionError):
    """A check of a bug this harness found once (fixed since): its own class, so the report names it."""


class LateWriteTraceback(KnownBug):
    pass


class HeartbeatThreadDied(KnownBug):
    pass


def traceback_heads(text: str) -> list[str]:
    """For each traceback chain printed in ``text``, the line printed just before it (what printed it: Optuna's
    "[W ...] Trial N failed ..." record, "Exception in thread ... (_record_heartbeat):", ...)."""
    lines = [line for line in text.splitlines() if line.strip()]
    heads = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            before = lines[i - 1] if i else ""
            if not before.startswith(("During handling of the above exception", "The above exception was")):
                heads.append(before)
    return heads


def tracebacks(run: Run) -> list[tuple[str, str, str]]:
    """(host, log file, head) of every traceback a worker printed."""
    return [(run.host_of[pid], log.name, head) for pid, log in run.logs.items()
            for head in traceback_heads(log.read_text())]


def _heartbeat(head: str) -> bool:
    return "(_record_heartbeat)" in head


def _late_write(head: str) -> bool:
    return "UpdateFinishedTrialError" in head


def check_no_other_traceback(run: Run) -> None:
    """No worker printed a traceback, but for the known bugs (check_late_writes, check_heartbeats_survive)."""
    assert run.error is None, run.error
    other = [t for t in tracebacks(run) if not _heartbeat(t[2]) and not _late_write(t[2])]
    assert not other, f"{other}\n{run.tail()}"


def check_late_writes(run: Run) -> None:
    """The cut host's workers were told, in one line, that their trials were taken over, and printed no traceback."""
    assert run.error is None, run.error
    assert run.cut_host is not None
    logs = [log.read_text() for pid, log in run.logs.items() if run.host_of[pid] == run.cut_host]
    assert any(TAKEN_OVER in text for text in logs), run.tail()
    late = [t for t in tracebacks(run) if t[0] == run.cut_host and _late_write(t[2])]
    if late:
        raise LateWriteTraceback(f"{late}\n{run.tail()}")


def check_heartbeats_survive(run: Run) -> None:
    """No heartbeat thread ended with an exception (on the cut host, whose trials fail anyway, one may)."""
    assert run.error is None, run.error
    dead = [t for t in tracebacks(run) if _heartbeat(t[2]) and t[0] != run.cut_host]
    if dead:
        raise HeartbeatThreadDied(f"{dead}\n{run.tail()}")


# Found by this harness, fixed since (tested here):
# - LateWriteTraceback: when a cut host's link came back, its worker's refused late write (UpdateFinishedTrialError:
#   another host had failed its trial as stale) was logged by Optuna with two tracebacks before hpsearch's one-line
#   warning (the objective stored an 'error' attr on the finished trial; the log filter let the record through).
# - HeartbeatThreadDied: a PostgreSQL restart ended the heartbeat thread of the trials running then (record_heartbeat
#   raised in Optuna's thread), so a trial still running a grace period later was failed as stale under its live
#   worker. HeartbeatStorage.record_heartbeat now outlives a failed beat.


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return play(SHORT, tmp_path_factory.mktemp("multihost-short"))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return play(FULL, tmp_path_factory.mktemp("multihost-full"))


@pytest.mark.services
def test_short_study_ends_right(short: Run):
    check_end_state(short)


@pytest.mark.services
def test_short_no_unexpected_traceback(short: Run):
    check_no_other_traceback(short)
    check_heartbeats_survive(short)  # no PostgreSQL restart here


@pytest.mark.services
def test_short_cut_host_late_writes_are_refused_in_one_line(short: Run):
    check_late_writes(short)


@pytest.mark.slow
@pytest.mark.services
def test_full_study_ends_right(full: Run):
    check_end_state(full)


@pytest.mark.slow
@pytest.mark.services
def test_full_no_unexpected_traceback(full: Run):
    check_no_other_traceback(full)


@pytest.mark.slow
@pytest.mark.services
def test_full_cut_host_late_writes_are_refused_in_one_line(full: Run):
    check_late_writes(full)


@pytest.mark.slow
@pytest.mark.services
def test_full_heartbeats_survive_a_postgresql_restart(full: Run):
    check_heartbeats_survive(full)
