"""A multi-host test harness on one Linux machine (issue #25, item 1): "hosts" are network namespaces joined by
veth pairs to a bridge, each with a private mount namespace (its own /tmp, home and hpsearch cache on a tmpfs), so
the workers of different hosts share nothing but what a real cluster shares: the database and the S3 artifact
store, both reached over the veth network.

- ``Cluster(n_hosts, workdir)``: a bridge with a random 10.77.X.0/24 subnet (the bridge is X.1 in the root
  namespace, host i is X.(10+i)); a TCP forwarder on X.1:5432 to the PostgreSQL server on 127.0.0.1:5432 (its
  pg_hba trusts 127.0.0.1, which is where the forwarded connections come from); moto's S3 server on X.1.
- ``Host.spawn(argv, log)``: a process inside the host (``ip netns exec`` + ``unshare -m``, a tmpfs on /tmp, HOME
  and HPSEARCH_CACHE/HPSEARCH_DATA under it); ``disk_full=True`` makes that tmpfs small and fills it first.
- ``Host.cut()`` / ``Host.restore()``: the host's link down / up (its veth in the root namespace).
- ``Cluster.database_outage(True/False)``: the forwarder drops the hosts' connections and closes new ones / forwards
  again: a database restart as long as the test wants it, whatever the real server's restart takes.
- ``Cluster.close()``: every process started in the hosts, the namespaces, veths, bridge, forwarder and moto go, also
  after a failure. Names carry the test process's pid, so leftovers of a killed test run are swept by the next.

Run as a script: ``multihost.py hpsearch ARGS`` is ``hpsearch ARGS`` with tests/chaos_worker.py's slow epochs and pid
attribute, plus the host's name on each trial (user attr ``multihost_host``); ``multihost.py forward LISTEN_IP
LISTEN_PORT TARGET_IP TARGET_PORT`` is the TCP forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_ATTR = "multihost_host"
PG_PORT = 5432
BUCKET = "hpsearch-multihost"
_PREFIX = "hpmh"  # namespaces: hpmh<pid>-<k>-<i>; bridges: hb<pid>-<k>; veths: hv<pid>-<k>-<i>
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def why_no_namespaces() -> str | None:
    """Why the harness cannot run here (None: it can): it needs root, ip, unshare, network namespaces, tmpfs mounts
    in a private mount namespace, and a TCP connection over a veth into a namespace."""
    if os.geteuid() != 0:
        return "the multi-host harness needs root (ip netns, veth, mount namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the multi-host harness needs {tool!r}, which is not installed"
    try:
        with Cluster(1, None) as cluster:
            out = cluster.hosts[0].run_in(
                "mount -t tmpfs -o size=1m tmpfs /tmp && touch /tmp/x && "
                f"{sys.executable} -c 'import socket; socket.create_connection((\"{cluster.bridge_ip}\", "
                f"{cluster.probe_port}), 5).close()' && echo ok")
            if out.strip() != "ok":
                return f"a process in a network namespace could not reach the bridge ({out.strip()[-300:]})"
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return f"cannot make network/mount namespaces here ({str(detail).strip().splitlines()[-1][:300]})"
    return None


def sweep_leftovers() -> None:
    """Namespaces, veths and bridges of test processes that are gone (killed before their clean-up)."""
    def dead(pid: str) -> bool:
        return not Path(f"/proc/{pid}").exists()

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"{_PREFIX}(\d+)-\d+-\d+", line)
        if m and dead(m.group(1)):
            for pid in _ip("netns", "pids", m.group(0), check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", m.group(0), check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: ((?:hb|hv|hp)(\d+)-[\d-]+)[@:]", line)
        if m and dead(m.group(2)):
            _ip("link", "del", m.group(1), check=False)


class Host:
    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster, self.index = cluster, index
        self.name = f"host{index}"
        self.ns = f"{_PREFIX}{cluster.tag}-{index}"
        self.veth = f"hv{cluster.tag}-{index}"
        self.address = f"{cluster.subnet}.{10 + index}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.is_cut = False

    def _create(self) -> None:
        peer = f"hp{self.cluster.tag}-{self.index}"
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.ns)
        _ip("link", "set", self.veth, "master", self.cluster.bridge, "up")
        for args in (("link", "set", peer, "name", "eth0"),
                     ("addr", "add", f"{self.address}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
            _ip("-n", self.ns, *args)

    def _wrap(self, script: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private", "sh", "-c", script]

    def run_in(self, script: str) -> str:
        """A shell script in the host (its own mount namespace), its output."""
        return subprocess.run(self._wrap(script), capture_output=True, text=True, timeout=60).stdout

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of this host: nothing of the test's own folders (all under /tmp, which the
        host does not see), the cluster's database and S3 endpoint."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HPSEARCH_", "AWS_", "PYTEST_", "XDG_", "TORCH_", "MPLCONFIGDIR", "TMP"))}
        env.update({"HOME": "/tmp/home", "TMPDIR": "/tmp", "HPSEARCH_CACHE": "/tmp/home/cache",
                    "HPSEARCH_DATA": "/tmp/home/data", "PYTHONPATH": str(ROOT), "COLUMNS": "200",
                    "MULTIHOST_HOST": self.name, **self.cluster.s3_env(), **(extra or {})})
        return env

    def spawn(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None, disk_full: bool = False,
              tmp_size: str = "256m") -> subprocess.Popen[bytes]:
        """``argv`` in this host with a private /tmp (a tmpfs), started as the process itself (same pid: ``ip netns
        exec``, ``unshare`` and ``sh`` exec it). ``disk_full``: the tmpfs is 4 MiB, filled before ``argv`` starts."""
        size = "4m" if disk_full else tmp_size
        fill = "dd if=/dev/zero of=/tmp/fill bs=64k >/dev/null 2>&1; " if disk_full else ""
        script = (f"mount -t tmpfs -o size={size} tmpfs /tmp && mkdir -p /tmp/home/cache /tmp/home/data /tmp/work "
                  f'&& {fill}cd /tmp/work && exec "$@"')
        with log.open("ab") as out:  # a file, not a pipe: nobody reads a pipe while the test polls
            proc = subprocess.Popen([*self._wrap(script), "sh", *argv], env=self.env(env), cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def signal(self, sig: int) -> None:
        for p in self.live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    def cut(self) -> None:
        """The host's link goes down: its packets to the database and the store (and theirs to it) are lost."""
        _ip("link", "set", self.veth, "down")
        self.is_cut = True

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")
        self.is_cut = False

    def _destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for pid in _ip("netns", "pids", self.ns, check=False).stdout.split():  # anything our processes started
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        _ip("netns", "del", self.ns, check=False)
        _ip("link", "del", self.veth, check=False)  # gone with the namespace's end, normally


class Cluster:
    """``n_hosts`` hosts on a bridge; with a ``workdir``, the PostgreSQL forwarder and moto's S3 server too."""

    def __init__(self, n_hosts: int, workdir: Path | None) -> None:
        self.n_hosts, self.workdir = n_hosts, workdir
        self.tag = f"{os.getpid()}-{next(_counter)}"
        self.bridge = f"hb{self.tag}"
        self.subnet = ""
        self.hosts: list[Host] = []
        self.services: list[subprocess.Popen[bytes]] = []
        self.s3_port = 0
        self._probe: socket.socket | None = None

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def probe_port(self) -> int:
        assert self._probe is not None
        return int(self._probe.getsockname()[1])

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        sweep_leftovers()
        used = _ip("-4", "-o", "addr", check=False).stdout
        choices = [s for s in (f"10.77.{x}" for x in random.sample(range(1, 255), 254)) if f" {s}." not in used]
        self.subnet = choices[0]
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n_hosts):
            host = Host(self, i)
            self.hosts.append(host)
            host._create()
        if self.workdir is None:  # why_no_namespaces' probe: a listening socket on the bridge
            self._probe = socket.create_server((self.bridge_ip, 0))
            return
        self._service([sys.executable, __file__, "forward", self.bridge_ip, str(PG_PORT), "127.0.0.1", str(PG_PORT)],
                      "forwarder.log", PG_PORT)
        self.s3_port = _free_port(self.bridge_ip)
        self._service([sys.executable, "-m", "moto.server", "-H", self.bridge_ip, "-p", str(self.s3_port)],
                      "moto.log", self.s3_port)
        import boto3

        boto3.session.Session().client("s3", **self._client_kwargs()).create_bucket(Bucket=BUCKET)

    def _service(self, argv: list[str], log: str, port: int) -> None:
        assert self.workdir is not None
        with (self.workdir / log).open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.services.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((self.bridge_ip, port), 1).close()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[1:3]} did not listen on {self.bridge_ip}:{port}: "
                                       f"{(self.workdir / log).read_text()[-1000:]}") from None
                time.sleep(0.1)

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://{self.bridge_ip}:{self.s3_port}"}

    def _client_kwargs(self) -> dict[str, str]:
        env = self.s3_env()
        return {"endpoint_url": env["AWS_ENDPOINT_URL"], "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing", "region_name": "us-east-1"}

    def s3_client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.session.Session().client("s3", **self._client_kwargs())

    def database_outage(self, down: bool) -> None:
        """The database as the hosts see it goes down (their connections dropped, new ones closed) or up again."""
        forwarder = self.services[0]
        os.kill(forwarder.pid, signal.SIGUSR1 if down else signal.SIGUSR2)

    def database_url(self, local_url: str) -> str:
        """A PostgreSQL URL on 127.0.0.1:5432 as the hosts reach it: through the forwarder on the bridge."""
        return local_url.replace(f"127.0.0.1:{PG_PORT}", f"{self.bridge_ip}:{PG_PORT}")

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host._destroy()
        for proc in self.services:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._probe is not None:
            self._probe.close()
        _ip("link", "del", self.bridge, check=False)


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- run as a script
async def _forward(listen_ip: str, listen_port: int, target_ip: str, target_port: int) -> None:
    """Forwards connections to the target. SIGUSR1: the target is "down" (every connection is closed, new ones are
    closed at once) until SIGUSR2: what clients see while a server restarts."""
    down = False
    open_writers: set[asyncio.StreamWriter] = set()

    def go_down() -> None:
        nonlocal down
        down = True
        for writer in list(open_writers):
            writer.close()

    def go_up() -> None:
        nonlocal down
        down = False

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, go_down)
    loop.add_signal_handler(signal.SIGUSR2, go_up)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(target_ip, target_port)
        except OSError:  # the server is restarting: the client sees its connection closed, as from the server
            writer.close()
            return
        open_writers.update((writer, up_writer))
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            open_writers.difference_update((writer, up_writer))

    server = await asyncio.start_server(client, listen_ip, listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


def _hpsearch(args: list[str]) -> None:
    from tests.chaos_worker import install

    install()  # slow epochs, the worker's pid on each trial
    import hpsearch.objective as objective

    make = objective.make_objective

    def tagged(*a, **k):  # type: ignore[no-untyped-def]
        inner = make(*a, **k)

        def run(trial):  # type: ignore[no-untyped-def]
            trial.set_user_attr(HOST_ATTR, os.environ["MULTIHOST_HOST"])
            return inner(trial)

        return run

    objective.make_objective = tagged
    from hpsearch.cli import main

    sys.argv = ["hpsearch", *args]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "forward":
        listen_ip, listen_port, target_ip, target_port = sys.argv[2:6]
        asyncio.run(_forward(listen_ip, int(listen_port), target_ip, int(target_port)))
    elif sys.argv[1] == "hpsearch":
        _hpsearch(sys.argv[2:])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} hpsearch ARGS | forward LISTEN_IP LISTEN_PORT TARGET_IP TARGET_PORT")
