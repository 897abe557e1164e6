"""Scaling out: the credit journal on SQLite and on a real PostgreSQL server, and the Ray Serve application
on a real local Ray cluster (2 replicas of the tiny bundle, credits in PostgreSQL).

Everything stays on this machine: PostgreSQL listens on a unix socket only (tests/pg_local.py), Ray and
its HTTP proxy on 127.0.0.1. Every wait is bounded; the cluster and the database are stopped at the end.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from needs import need

need("fastapi")
requests = need("requests")
need("psycopg")

from PIL import Image  # noqa: E402

from sd3trt.errors import Sd3trtError  # noqa: E402
from sd3trt.server.keystore import InsufficientCredits, open_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from pg_local import LocalPostgres, pg_bin  # noqa: E402
from helpers import restore_env, wait_until  # noqa: E402

PATH = "/v1/stable-diffusion-3-large-img2img"


@pytest.fixture(scope="module")
def pg():
    if pg_bin() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request, tmp_path):
    """A fresh, empty credit database of either kind: a SQLite path or a PostgreSQL URL (the SQLite runs need
    no PostgreSQL)."""
    if request.param == "sqlite":
        return tmp_path / "k.db"
    return request.getfixturevalue("pg").fresh_database("t" + format(zlib.crc32(request.node.name.encode()), "x"))


# -- the credit journal, the same tests on both stores -------------------------------------------------------

def test_keys_hashed_and_authenticated(store_at):
    store = open_store(store_at)
    key = store.create_key(3, name="t")
    key_id = key.split("_")[1]
    assert store.authenticate(key) == key_id
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("sd3_" + key_id + "_wrong") is None
    assert store.authenticate("garbage") is None and store.authenticate("") is None and store.authenticate(None) is None
    secret = key.split("_", 2)[2]
    assert all(secret not in str(row) for row in store._read("SELECT * FROM keys"))  # only the hash is stored
    if isinstance(store_at, Path):
        raw = store_at.read_bytes() + b"".join(p.read_bytes() for p in store_at.parent.glob("k.db-*"))
        assert secret.encode() not in raw
    store.set_disabled(key_id, True)
    assert store.authenticate(key) is None


def test_concurrent_debits_never_overspend(store_at):
    store = open_store(store_at)
    key_id = store.create_key(10).split("_")[1]
    stores = [open_store(store_at) for _ in range(4)]  # several connections, as several replicas have

    def one(i):
        try:
            return stores[i % 4].debit(key_id, 1)[0]
        except InsufficientCredits:
            return None

    with ThreadPoolExecutor(16) as ex:
        got = [d for d in ex.map(one, range(40)) if d is not None]
    assert len(got) == 10 and store.balance(key_id) == 0
    for d in got[:4]:
        assert store.refund(d) and not store.refund(d) and not store.commit(d)  # settled exactly once
    for d in got[4:]:
        assert store.commit(d) and not store.refund(d)
    assert store.balance(key_id) == 4


def test_debits_across_processes(store_at):
    """Two processes and this one share the database: the total taken never exceeds the balance."""
    store = open_store(store_at)
    key_id = store.create_key(25).split("_")[1]
    code = (
        "import sys\nfrom sd3trt.server.keystore import open_store, db_target, InsufficientCredits\n"
        "s = open_store(db_target(sys.argv[1])); n = 0\n"
        "for _ in range(20):\n"
        "    try: s.debit(sys.argv[2], 1); n += 1\n"
        "    except InsufficientCredits: pass\n"
        "print(n)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store_at), key_id], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    mine = 0
    for _ in range(20):
        try:
            store.debit(key_id, 1)
            mine += 1
        except InsufficientCredits:
            pass
    theirs = sum(int(p.communicate(timeout=60)[0]) for p in procs)
    assert mine + theirs == 25 and store.balance(key_id) == 0


def test_recovery_refunds_only_dead_owners(store_at):
    live = open_store(store_at)
    live.register_instance()
    key_id = live.create_key(10).split("_")[1]
    mine, _ = live.debit(key_id, 2)
    # A server process that takes a debit and dies without settling it.
    code = ("import sys, os\nfrom sd3trt.server.keystore import open_store, db_target\n"
            "s = open_store(db_target(sys.argv[1])); s.register_instance(); s.debit(sys.argv[2], 3)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(store_at), key_id], check=True, timeout=60)
    assert live.balance(key_id) == 5
    other = open_store(store_at)
    other.register_instance()
    assert other.recover() == 1  # the dead process's debit; the live instance's one stays pending
    assert live.balance(key_id) == 8
    assert [p[0] for p in live.pending()] == [mine]
    assert live.commit(mine) and live.balance(key_id) == 8
    # A predecessor that had our pid (a restart in a container gets pid 1 again) and a fresh heartbeat:
    # not an instance of this process, so gone.
    with other._tx() as db:
        db.execute("INSERT INTO instances VALUES ('old', ?, ?, 0, ?, NULL)", (socket.gethostname(), os.getpid(),
                                                                              time.time()))
        db.execute("UPDATE keys SET credits = credits - 1 WHERE id = ?", (key_id,))
        db.execute("INSERT INTO debits (key_id, amount, state, owner, created_at) VALUES (?, 1, 'pending', 'old', 0)",
                   (key_id,))
    assert other.recover() == 1 and live.balance(key_id) == 8
    # A live instance on another host is judged by its lease only: fresh is kept, stale is refunded.
    for name, beat in (("far-live", time.time()), ("far-stale", time.time() - 1000)):
        with other._tx() as db:
            db.execute("INSERT INTO instances VALUES (?, 'another-host', 1, 0, ?, NULL)", (name, beat))
            db.execute("UPDATE keys SET credits = credits - 1 WHERE id = ?", (key_id,))
            db.execute("INSERT INTO debits (key_id, amount, state, owner, created_at) VALUES (?, 1, 'pending', ?, 0)",
                       (key_id, name))
    assert other.recover() == 1 and live.balance(key_id) == 7
    assert [p[3] for p in live.pending()] == ["far-live"]


def test_replicas_recovering_at_once_refund_each_debit_once(store_at):
    """A dead replica left 6 debits; 4 live ones recover at the same moment: 6 refunds in all, no deadlock."""
    store = open_store(store_at)
    key_id = store.create_key(20).split("_")[1]
    code = ("import sys, os\nfrom sd3trt.server.keystore import open_store, db_target\n"
            "s = open_store(db_target(sys.argv[1])); s.register_instance()\n"
            "for _ in range(6): s.debit(sys.argv[2], 1)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(store_at), key_id], check=True, timeout=60)
    assert store.balance(key_id) == 14
    replicas = [open_store(store_at) for _ in range(4)]
    for r in replicas:
        r.register_instance()
    with ThreadPoolExecutor(4) as ex:
        refunded = list(ex.map(lambda r: r.recover(), replicas))
    assert sum(refunded) == 6 and store.balance(key_id) == 20 and not store.pending()


def test_charge_after_a_peer_refunded_the_debit(store_at):
    a = open_store(store_at)
    a.register_instance()
    peer = open_store(store_at)
    key_id = a.create_key(2).split("_")[1]
    d1, _ = a.debit(key_id, 1)
    d2, _ = a.debit(key_id, 1)
    assert a.charge(d1) == d1 and a.charge(d1) == d1  # the normal case; idempotent
    assert peer.refund(d2, "server stopped before finishing") and a.balance(key_id) == 1
    d3 = a.charge(d2)  # A's image is ready: charged again, in one transaction
    assert d3 not in (None, d2) and a.balance(key_id) == 0
    a.topup(key_id, 1)
    d4, _ = a.debit(key_id, 1)
    assert peer.refund(d4, "server stopped before finishing")
    peer.debit(key_id, 1)  # the peer spends the refunded credit
    assert a.charge(d4) is None and a.balance(key_id) == 0  # nothing to pay with: the image is withheld
    assert a.refund_delivered(d3) and not a.refund_delivered(d3) and a.balance(key_id) == 1
    assert not a.refund_delivered(d4)
    states = dict(a._read("SELECT state, COUNT(*) FROM debits GROUP BY state"))
    assert states == {"committed": 1, "refunded": 3, "pending": 1}
    keys = a.list_keys()
    assert [(k.credits, k.pending, k.spent) for k in keys] == [(1, 1, 1)]


def test_charge_is_idempotent_when_called_again_after_a_lost_answer(store_at):
    """A charge whose answer was lost to an outage is called again: the same committed debit comes back,
    also when the first call had to charge again (a peer refunded the debit), so nothing is taken twice."""
    a = open_store(store_at)
    a.register_instance()
    peer = open_store(store_at)
    key_id = a.create_key(5).split("_")[1]
    d1, _ = a.debit(key_id, 1)
    assert peer.refund(d1, "server stopped before finishing") and a.balance(key_id) == 5
    again = a.charge(d1)
    assert again not in (None, d1) and a.balance(key_id) == 4
    assert a.charge(d1) == again and a.charge(d1) == again and a.balance(key_id) == 4
    d2, _ = a.debit(key_id, 1)  # another request's debit refunded too: charged again on its own
    assert peer.refund(d2, "server stopped before finishing")
    assert a.charge(d2) not in (None, d2, again) and a.balance(key_id) == 3


def test_schema_is_created_once_and_versioned(store_at):
    stores = []
    with ThreadPoolExecutor(4) as ex:  # replicas starting together on an empty database
        stores = list(ex.map(lambda _: open_store(store_at), range(4)))
    assert all(s.schema_version() == 1 for s in stores)
    with stores[0]._tx() as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(Sd3trtError, match="schema version 99"):
        open_store(store_at)


def test_sqlite_replicas_starting_together_all_open(tmp_path):
    """SQLite answers "database is locked" at once, without waiting, to a connection switching a new file to WAL
    while another does: 4 stores opening one new file, 30 times (13% of rounds failed before the retry)."""
    for i in range(30):
        with ThreadPoolExecutor(4) as ex:
            stores = list(ex.map(lambda _: open_store(tmp_path / f"k{i}.db"), range(4)))
        assert all(s.schema_version() == 1 for s in stores)
        for s in stores:
            s.close()


def test_cli_keys_on_postgresql(pg):
    url = pg.fresh_database("cli")
    run = lambda *a: subprocess.run([sys.executable, "-m", "sd3trt.server", "keys", *a, "--db", url],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = run("add", "--credits", "4", "--name", "pg")
    assert out.returncode == 0, out.stderr
    key_id = out.stdout.split("_")[1]
    assert run("topup", key_id, "--credits", "3").returncode == 0
    listed = run("list").stdout
    assert key_id in listed and " 7 " in listed
    assert open_store(url).balance(key_id) == 7


def test_two_servers_on_postgresql_stalled_one_loses_its_debits_and_the_fence_holds(pg, tiny_sd3, tmp_path):
    """tests/test_server_instances.py's fence test, with the credits in PostgreSQL: two `sd3trt serve`
    processes; A stopped (SIGSTOP) past its lease loses its pending debits to B's recovery, B spends the
    credits, A resumes: one image charged again, the other withheld (503 payment_lost)."""
    import signal

    from test_server import ServerProcess, post

    url = pg.fresh_database("fence")
    args = ("--heartbeat", "0.5", "--lease", "3", "--max-steps", "6000", "--graceful-timeout", "1",
            "--inflight-grace", "1")
    a = ServerProcess(tiny_sd3[1], url, tmp_path / "a.log", *args).start()
    b = ServerProcess(tiny_sd3[1], url, tmp_path / "b.log", *args).start()
    store = open_store(url)
    key = store.create_key(5)
    key_id = key.split("_")[1]
    pool = ThreadPoolExecutor(2)
    try:
        on_a = [pool.submit(post, a, key, num_inference_steps=800) for _ in range(2)]  # one generating, one queued
        (a_id,) = store._read("SELECT id FROM instances WHERE pid = ? AND stopped_at IS NULL", (a.proc.pid,))[0]
        wait_until(lambda: sum(1 for p in store.pending() if p[3] == a_id) == 2, what="A's two debits")
        a.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: store.balance(key_id) == 5, timeout=25, what="B to refund A's pending debits")
        on_b = [post(b, key) for _ in range(4)]
        assert [r.status_code for r in on_b] == [200] * 4 and store.balance(key_id) == 1
        a.proc.send_signal(signal.SIGCONT)
        from_a = [f.result(timeout=120) for f in on_a]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for srv in (a, b):
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGCONT)
            srv.stop(signal.SIGKILL)
    codes = sorted(r.status_code for r in from_a)
    assert codes == [200, 503], [(r.status_code, r.text[:200]) for r in from_a]
    assert next(r for r in from_a if r.status_code == 503).json()["code"] == "payment_lost"
    states = dict(store._read("SELECT state, CAST(SUM(amount) AS BIGINT) FROM debits WHERE key_id = ? GROUP BY state",
                              (key_id,)))
    images = 4 + codes.count(200)
    assert images == 5 - store.balance(key_id) == states["committed"] == 5 and not store.pending()


# -- Ray Serve on a real local cluster, credits in PostgreSQL --------------------------------------------------

def png(w=64, h=64) -> bytes:
    im = Image.new("RGB", (w, h), (200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def body(**kw) -> dict:
    d = {"image": base64.b64encode(png()).decode(), "prompt": "a red square", "num_inference_steps": 2,
         "output_format": "png"}
    d.update(kw)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def listeners_beyond_loopback(pids: set[int]) -> list[str]:
    """TCP sockets listening on an address other than loopback, held by any of ``pids`` (from /proc)."""
    inodes = {}
    for table, loop in (("/proc/net/tcp", ("0100007F",)), ("/proc/net/tcp6", ("00000000000000000000000001000000",
                                                                             "0000000000000000FFFF00000100007F"))):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, state, inode = f[1], f[3], f[9]
            if state == "0A" and addr.split(":")[0] not in loop:
                inodes[inode] = f"{table}:{addr}"
    found = []
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.append(f"pid {pid} {Path(f'/proc/{pid}/comm').read_text().strip()}: {inodes[link[8:-1]]}")
        except OSError:
            continue
    return found


class Cluster:
    def __init__(self, url: str, db: str):
        self.url, self.db = url, db

    def post(self, key, timeout=120, **kw):
        return requests.post(self.url + PATH, json=body(**kw), headers={"x-api-key": key}, timeout=timeout)

    def store(self):
        return open_store(self.db)

    def running_replicas(self) -> int:
        from ray import serve
        from ray.serve.schema import ReplicaState

        app = serve.status().applications.get("sd3trt")
        if app is None or "Sd3trtReplica" not in app.deployments:
            return 0
        return app.deployments["Sd3trtReplica"].replica_states.get(ReplicaState.RUNNING, 0)

    @staticmethod
    def replicas():
        """Serve's replica actors, with each one's pid."""
        import ray

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::")]
        handles = [ray.get_actor(n, namespace="serve") for n in names]
        pids = ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in handles], timeout=30)
        return handles, pids

    def posts_per_replica(self) -> list[int]:
        """POST requests each replica's own app has answered (its metrics, read inside the replica)."""
        import ray

        def count(actor):
            # The replica actor wraps the deployment's instance (Ray internals, for this figure only).
            user = actor._replica_impl._user_callable_wrapper.user_callable
            reqs = user._asgi_app.state.server.metrics.requests
            return sum(n for (method, _route, _status), n in reqs.items() if method == "POST")
        handles, _ = self.replicas()
        return ray.get([h.__ray_call__.remote(count) for h in handles], timeout=30)

    def live_instances(self) -> list[tuple[str, int]]:
        return self.store()._read("SELECT id, pid FROM instances WHERE stopped_at IS NULL ORDER BY started_at")


@pytest.fixture(scope="module")
def ray_cluster(pg, tiny_sd3):
    ray = need("ray")
    from ray import serve

    from sd3trt.server import ray_serve

    db = pg.fresh_database("ray")
    settings = {"SD3TRT_BUNDLE": str(tiny_sd3[1]), "SD3TRT_DB": db, "SD3TRT_HEARTBEAT": "1", "SD3TRT_LEASE": "6",
                "SD3TRT_MAX_INFLIGHT_PER_KEY": "64", "SD3TRT_QUEUE_SIZE": "64", "SD3TRT_THREADS": "1",
                "SD3TRT_MAX_STEPS": "5000", "SD3TRT_NO_URL_FETCH": "1", "OMP_NUM_THREADS": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                # Ray binds its servers to the node address; this makes that 127.0.0.1 (nothing beyond loopback).
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # the local cluster's processes, replicas included, inherit them
    from ray._private import ray_constants
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER  # read at import (ray may be imported already)
    ray_constants.ENABLE_RAY_CLUSTER = False
    port = free_port()
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=150 * 1024 * 1024, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_serve.deployment.options(num_replicas=2, ray_actor_options={"num_cpus": 1, "num_gpus": 0}).bind()
        serve.run(app, name="sd3trt", route_prefix="/")
        c = Cluster(f"http://127.0.0.1:{port}", db)
        wait_until(lambda: len(c.live_instances()) == 2, what="2 replicas registered in the database")
        # Both replicas ready: /readyz answered 200 by the replicas the proxy picks, several times in a row.
        streak = {"n": 0}

        def ready():
            r = requests.get(c.url + "/readyz", timeout=10)
            streak["n"] = streak["n"] + 1 if r.status_code == 200 else 0
            return streak["n"] >= 8
        wait_until(ready, timeout=120, what="the replicas to load the bundle")
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        # Nothing of the cluster listens beyond loopback, except one port per Serve replica: its
        # inter-deployment gRPC server, which Ray Serve binds to [::]:0 unconditionally (replica.py);
        # no test connects to it (the proxy reaches replicas through Ray's loopback-bound core).
        beyond = listeners_beyond_loopback(_descendants(os.getpid()))
        serve_grpc = [x for x in beyond if " ray::ServeRepli" in x]
        assert len(serve_grpc) == len(beyond) and len({x.split()[1] for x in serve_grpc}) == len(serve_grpc), beyond
        c.startup_s = time.monotonic() - t0
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
            restore_env(saved)


def test_ray_32_concurrent_requests_on_10_credits(ray_cluster):
    c = ray_cluster
    store = c.store()
    key = store.create_key(10)
    key_id = key.split("_")[1]
    before = c.posts_per_replica()
    with ThreadPoolExecutor(32) as ex:
        t0 = time.monotonic()
        rs = list(ex.map(lambda _: c.post(key), range(32)))
        took = time.monotonic() - t0
    codes = sorted(r.status_code for r in rs)
    ok = [r for r in rs if r.status_code == 200]
    assert len(ok) == 10 and codes.count(406) == 22, codes
    for r in ok:
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert store.balance(key_id) == 0 and not store.pending()
    per_owner = dict(store._read("SELECT owner, COUNT(*) FROM debits WHERE key_id = ? AND state = 'committed' "
                                 "GROUP BY owner", (key_id,)))
    assert sum(per_owner.values()) == 10 and 1 <= len(per_owner) <= 2, per_owner
    served = [n - b for n, b in zip(c.posts_per_replica(), before)]
    # Both replicas handle requests; which of them wins the 10 debits is a race (seen 1/9, 4/6 and 0/10).
    assert sum(served) == 32 and min(served) > 0, served
    print(f"\n[figures] 32 requests on 10 credits: {len(ok)} images, {codes.count(406)} x 406 in {took:.1f} s; "
          f"requests per replica {sorted(served)}, images per replica {sorted(per_owner.values())}; cluster up in {c.startup_s:.1f} s")
    # The app's endpoints through Ray's proxy.
    assert requests.get(c.url + "/healthz", timeout=10).json() == {"status": "ok"}
    assert "sd3trt_" in requests.get(c.url + "/metrics", timeout=10).text


def test_ray_replica_killed_mid_request_is_refunded_and_replaced(ray_cluster):
    import ray

    c = ray_cluster
    store = c.store()
    key = store.create_key(20)
    key_id = key.split("_")[1]
    pool = ThreadPoolExecutor(8)
    try:
        # Slow requests until both replicas hold a pending debit (the proxy picks the replica).
        slow = []
        for _ in range(6):
            slow.append(pool.submit(c.post, key, 180, num_inference_steps=2500))
            time.sleep(0.3)
            owners = {p[3] for p in store.pending()}
            if len(owners) == 2:
                break
        wait_until(lambda: len({p[3] for p in store.pending()}) == 2, timeout=60, what="a pending debit on each replica")
        pending = store.pending()
        victim_owner = pending[0][3]
        survivor_debits = [p[0] for p in pending if p[3] != victim_owner]
        victim_debits = [p[0] for p in pending if p[3] == victim_owner]
        victim_pid = dict(c.live_instances())[victim_owner]

        # The victim's actor, found by its pid among Serve's replica actors.
        handles, pids = c.replicas()
        victim = handles[pids.index(victim_pid)]
        balance_before = store.balance(key_id)
        known = {i for i, _ in c.live_instances()}
        t_kill = time.monotonic()
        ray.kill(victim, no_restart=True)

        # Its debits are refunded by the survivor's lease thread (the pid is dead); the survivor's stay pending.
        wait_until(lambda: all(s == "refunded" for (s,) in [store._read("SELECT state FROM debits WHERE id = ?", (d,))[0]
                                                        for d in victim_debits]), timeout=30,
              what="the killed replica's debits to be refunded")
        refunded_s = time.monotonic() - t_kill
        assert store.balance(key_id) == balance_before + len(victim_debits)
        states = {d: store._read("SELECT state FROM debits WHERE id = ?", (d,))[0][0] for d in survivor_debits}
        assert all(s in ("pending", "committed") for s in states.values()), states

        # Serve replaces the replica; the new one registers and serves.
        wait_until(lambda: c.running_replicas() == 2 and {i for i, _ in c.live_instances()} - known, timeout=120, every=0.2,
              what="Serve to replace the killed replica")
        replaced_s = time.monotonic() - t_kill

        results = [f.result(timeout=180) for f in slow]
        codes = [r.status_code for r in results]
        assert codes.count(200) == len(survivor_debits), codes  # the survivor's requests were unaffected
        assert all(code >= 500 for code in codes if code != 200), codes  # the victim's clients got an error
        assert not store.pending()
        committed = store._read("SELECT COUNT(*) FROM debits WHERE key_id = ? AND state = 'committed'", (key_id,))[0][0]
        assert committed == codes.count(200) and store.balance(key_id) == 20 - committed
        # After the replacement every request is served.
        after = [pool.submit(c.post, key) for _ in range(4)]
        assert [f.result(timeout=120).status_code for f in after] == [200] * 4
        print(f"\n[figures] replica killed with {len(victim_debits)} request(s) in flight: refunded after "
              f"{refunded_s:.1f} s, replaced (running and registered) after {replaced_s:.1f} s; survivor's "
              f"{len(survivor_debits)} request(s) served 200")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_ray_config_file_is_a_valid_serve_config():
    need("ray")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "server" / "ray-serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    (application,) = schema.applications
    assert application.import_path == "sd3trt.server.ray_serve:app"
    (dep,) = application.deployments
    assert (dep["name"] if isinstance(dep, dict) else dep.name) == "Sd3trtReplica"
