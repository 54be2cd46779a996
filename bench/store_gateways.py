"""Benchmark: several gateways, one feedback store (issue 18, part 4).

Two ways for more than one tuneloop server ("gateway") to record into one feedback store:

A. a store process: one process owns the DuckDB file (a `FeedbackStore`, its writer thread and
   group commits) and takes batches of writes over a Unix socket; each gateway batches the writes
   of its clients that are waiting into one request and acknowledges each client once the store
   says its row is committed.
B. DuckLake: each gateway attaches one DuckLake catalog (SQLite catalog file + a data folder) and
   commits itself. The `ducklake` extension must load into the pinned DuckDB; this checks that
   first (`INSTALL ducklake` downloads from DuckDB's own site, which this machine cannot reach;
   `--ducklake-ext FILE` tries a local file). Where it cannot load, `--ducklake-python PY` runs
   the DuckLake measurement with another interpreter whose duckdb can load it (a scratch venv
   with a duckdb and `duckdb-extension-ducklake` / `duckdb-extension-sqlite-scanner` of the same
   version, all from PyPI), for the figures beside A's.

A: the clients (closed loop, one write at a time, each a thumbs or a rating vote on a response
prepared in the store; a vote on an item of its own) run in this process over TCP on 127.0.0.1,
spread over the two gateway processes; a gateway forwards whatever its clients have waiting as one
frame (one in flight per gateway by default), the store process submits each write to its
FeedbackStore and answers once all of the frame's writes are committed. Runs at rising numbers of
clients give the ceiling (writes/s stops growing); a last run SIGKILLs one gateway half-way: its
clients reconnect to the other gateway and send their unanswered write again (a vote is keyed by
rater and item, so a repeat replaces, never doubles). Afterwards the DuckDB file must hold every
row acknowledged to a client: 0 lost.

B: two processes, `--ducklake-threads` threads each (16: 32 in all), each a client that needs its
row committed; either a commit per row, or a group commit per process (the clients' rows waiting
are written in one transaction by one writer thread, as the FeedbackStore does).

    python bench/store_gateways.py [--seconds 4] [--warmup 1] [--levels 32,64,128]
        [--ducklake-python /tmp/dlvenv/bin/python]

This file must run under a bare duckdb too (the DuckLake child role): tuneloop and orjson are
imported only where the store-process roles need them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
GOAL_WRITES_PER_S = 1000.0
POOLS = 32  # conversations of prepared responses; client c votes on pool c % POOLS
ANSWERS = 200  # responses per pool
FRAME = struct.Struct("!I")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- A: the store process ----------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return await reader.readexactly(n)


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload)) + payload


def run_store(db: Path, sock: Path) -> None:
    """Own the DuckDB file; answer frames {"i": n, "r": [[kind, rater, response, value]...]}
    with {"i": n, "a": [id or "E:reason", ...]} once every write of the frame is committed."""
    import orjson
    import uvloop

    from tuneloop.core.records import Rating, Thumbs
    from tuneloop.feedback.store import FeedbackStore

    store = FeedbackStore(db)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        def answer(req_id: int, futs: list) -> None:
            out = []
            for f in futs:
                exc = f.exception()
                out.append(f"E:{type(exc).__name__}: {exc}" if exc else f.result())
            writer.write(frame(orjson.dumps({"i": req_id, "a": out})))

        while True:
            try:
                msg = orjson.loads(await read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            futs = []
            for kind, rater, rid, value in msg["r"]:
                fb = (
                    Thumbs(rid, value, rater_id=rater)
                    if kind == "t"
                    else Rating(rid, value, rater_id=rater)
                )
                try:
                    futs.append(store.submit_feedback(fb))
                except Exception as exc:  # noqa: BLE001 - answered to the gateway
                    from concurrent.futures import Future

                    bad: Future = Future()
                    bad.set_exception(exc)
                    futs.append(bad)
            left = [len(futs)]
            lock = threading.Lock()
            req_id = msg["i"]

            def done(_f, req_id=req_id, futs=futs, left=left, lock=lock) -> None:
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:  # the writer thread: hand the answer to the event loop
                    loop.call_soon_threadsafe(answer, req_id, futs)

            for f in futs:
                f.add_done_callback(done)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path=str(sock))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        async with server:
            await stop.wait()

    uvloop.run(main())
    store.close()


def run_gateway(store_sock: Path, port_file: Path, inflight: int, max_batch: int) -> None:
    """Serve clients on TCP (a line "t|r rater response value" in, a line "id" or "E reason"
    out); forward what is waiting to the store as one frame, `inflight` frames at most."""
    import orjson
    import uvloop

    async def main() -> None:
        s_reader, s_writer = await asyncio.open_unix_connection(str(store_sock))
        waiting: list[tuple[list, asyncio.Future]] = []
        have_work = asyncio.Event()
        slots = asyncio.Semaphore(inflight)
        sent: dict[int, list[asyncio.Future]] = {}
        next_id = 0

        async def sender() -> None:
            nonlocal next_id
            while True:
                await have_work.wait()
                await slots.acquire()
                batch = waiting[:max_batch]
                del waiting[:max_batch]
                if not waiting:
                    have_work.clear()
                if not batch:
                    slots.release()
                    continue
                next_id += 1
                sent[next_id] = [f for _, f in batch]
                s_writer.write(frame(orjson.dumps({"i": next_id, "r": [r for r, _ in batch]})))

        async def receiver() -> None:
            while True:
                msg = orjson.loads(await read_frame(s_reader))
                slots.release()
                for f, a in zip(sent.pop(msg["i"]), msg["a"], strict=True):
                    if not f.done():
                        f.set_result(a)

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while line := await reader.readline():
                    kind, rater, rid, value = line.split()
                    fut = loop.create_future()
                    waiting.append(([kind.decode(), rater.decode(), int(rid), int(value)], fut))
                    have_work.set()
                    a = await fut
                    writer.write(f"{a}\n".encode() if isinstance(a, int) else f"E {a}\n".encode())
            writer.close()

        tasks = [asyncio.create_task(sender()), asyncio.create_task(receiver())]
        server = await asyncio.start_server(client, HOST, 0, backlog=1024)
        port_file.write_text(str(server.sockets[0].getsockname()[1]))
        print("ready", flush=True)
        async with server:
            await asyncio.gather(*tasks)

    uvloop.run(main())


def prepare_store(db: Path) -> list[list[int]]:
    """POOLS conversations of ANSWERS responses each, written straight to the store; their ids."""
    from tuneloop.core.records import Message, Response, SamplingParams
    from tuneloop.feedback.store import FeedbackStore

    prompt = (Message("user", "Name three uses of a feedback loop."),)
    pools = []
    with FeedbackStore(db) as store:
        futures = []
        for k in range(POOLS):
            owner = f"owner-{k}"
            cid = store.new_conversation_id(owner)
            ids = [store.new_response_id() for _ in range(ANSWERS)]
            pools.append(ids)
            futures += [
                store.submit_response(
                    Response(
                        rid,
                        cid,
                        prompt,
                        f"answer {rid}",
                        "bench",
                        SamplingParams(),
                        4,
                        4,
                        1.0,
                        rater_id=owner,
                    )
                )
                for rid in ids
            ]
        for f in futures:
            f.result()
    return pools


def write_of(client: int, n: int, pools: list[list[int]]) -> tuple[str, str, int, int]:
    """Client `client`'s n-th write: (kind t|r, rater, response id, value), a vote on an item of
    its own (a rater of its own per 2 * ANSWERS writes)."""
    ids = pools[client % len(pools)]
    epoch, j = divmod(n, 2 * len(ids))
    rater = f"c{client}e{epoch}"
    if j < len(ids):
        return "t", rater, ids[j], 1 if j % 3 else -1
    return "r", rater, ids[j - len(ids)], 1 + j % 5


@dataclass
class Tally:
    acked: list[tuple[str, str, int, int]] = field(default_factory=list)  # kind, rater, item, id
    window_acked: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retried: int = 0  # writes sent again to the other gateway after their gateway died
    n_sent: int = 0


async def drive(
    ports: list[int],
    clients: int,
    pools: list[list[int]],
    warmup: float,
    seconds: float,
    kill: tuple[float, int] | None = None,
    gateways: list[subprocess.Popen] | None = None,
    offset: int = 0,
) -> Tally:
    """`clients` closed-loop clients, client c on gateway c % len(ports); with `kill` =
    (seconds after the start, gateway index), that gateway is SIGKILLed then."""
    tally = Tally()
    t0 = time.perf_counter()
    start, end = t0 + warmup, t0 + warmup + seconds
    dead: set[int] = set()

    async def client(c: int) -> None:
        g = c % len(ports)
        reader, writer = await asyncio.open_connection(HOST, ports[g])
        n = 0
        try:
            while (now := time.perf_counter()) < end:
                kind, rater, rid, value = write_of(offset + c, n, pools)
                writer.write(f"{kind} {rater} {rid} {value}\n".encode())
                tally.n_sent += 1
                try:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionResetError("gateway closed")
                except (OSError, asyncio.IncompleteReadError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    writer.close()
                    g = next(i for i in range(len(ports)) if i not in dead)  # fail over
                    reader, writer = await asyncio.open_connection(HOST, ports[g])
                    tally.retried += 1
                    continue  # the same write (n unchanged) again, on the other gateway
                done = time.perf_counter()
                n += 1
                if line.startswith(b"E"):
                    tally.errors[line.decode().strip()[:80]] += 1
                    continue
                tally.acked.append((kind, rater, rid, int(line)))
                if now >= start and done <= end:
                    tally.window_acked += 1
                    tally.latencies.append(done - now)
        finally:
            writer.close()

    async def killer() -> None:
        assert kill is not None and gateways is not None
        await asyncio.sleep(kill[0])
        dead.add(kill[1])
        gateways[kill[1]].send_signal(signal.SIGKILL)

    jobs = [client(c) for c in range(clients)]
    if kill:
        jobs.append(killer())
    await asyncio.wait_for(asyncio.gather(*jobs), warmup + seconds + 60)
    return tally


class Procs:
    """The store process and the gateways, each `python this_file --role ...`."""

    def __init__(self, tmp: Path, n_gateways: int, inflight: int, max_batch: int) -> None:
        self.tmp = tmp
        self.db, self.sock = tmp / "feedback.duckdb", tmp / "store.sock"
        me = [sys.executable, str(Path(__file__).resolve())]
        self.store = self._start(
            me + ["--role", "store", "--db", str(self.db), "--sock", str(self.sock)], "store"
        )
        self.gateways, self.ports = [], []
        for g in range(n_gateways):
            pf = tmp / f"gw{g}.port"
            self.gateways.append(
                self._start(
                    me
                    + [
                        "--role",
                        "gateway",
                        "--sock",
                        str(self.sock),
                        "--port-file",
                        str(pf),
                        "--inflight",
                        str(inflight),
                        "--max-batch",
                        str(max_batch),
                    ],
                    f"gw{g}",
                )
            )
            self.ports.append(int(pf.read_text()))

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        )
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        if p.stdout.readline().strip() != "ready":
            p.kill()
            raise RuntimeError(f"{name} did not start:\n{(self.tmp / f'{name}.log').read_text()}")
        return p

    def stop(self) -> None:
        for p in self.gateways:
            if p.poll() is None:
                p.terminate()
        for p in self.gateways:
            p.wait(10)
        self.store.send_signal(signal.SIGTERM)
        self.store.wait(60)


def check_stored(db: Path, acked: list[tuple[str, str, int, int]]) -> tuple[int, int]:
    """(acknowledged votes, those not in the file): each (table, rater, item) acknowledged must
    be a row (a repeat of a vote replaced it and kept its id)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    stored = {
        (t, rater, item)
        for t, table in (("t", "thumbs"), ("r", "ratings"))
        for rater, item in con.execute(f"SELECT rater_id, item FROM {table}").fetchall()
    }
    con.close()
    want = {(k, rater, str(rid)) for k, rater, rid, _ in acked}
    return len(want), len(want - stored)


@dataclass
class Row:
    option: str
    clients: str
    writes_s: float
    p50: float
    p99: float
    errors: int
    note: str = ""


def store_runs(args: argparse.Namespace, tmp: Path) -> list[Row]:
    pools = prepare_store(tmp / "feedback.duckdb")
    rows: list[Row] = []
    procs = Procs(tmp, 2, args.inflight, args.max_batch)
    offset = 0
    all_acked: list[tuple[str, str, int, int]] = []
    try:
        for clients in args.levels:
            cpu0 = cpu_seconds(procs.store.pid), [cpu_seconds(g.pid) for g in procs.gateways]
            own0 = cpu_seconds(os.getpid())
            t0 = time.perf_counter()
            tally = asyncio.run(
                drive(procs.ports, clients, pools, args.warmup, args.seconds, offset=offset)
            )
            elapsed = time.perf_counter() - t0
            offset += clients  # each run's clients vote as raters of their own
            all_acked += tally.acked
            n = max(len(tally.acked), 1)
            s_cpu = (cpu_seconds(procs.store.pid) - cpu0[0]) / n * 1e6
            g_cpu = sum(cpu_seconds(g.pid) for g in procs.gateways) - sum(cpu0[1])
            c_cpu = cpu_seconds(os.getpid()) - own0
            lat = sorted(tally.latencies)
            store_cores = s_cpu * len(tally.acked) / elapsed / 1e6
            rows.append(
                Row(
                    "A store process",
                    f"{clients} over 2 gw",
                    tally.window_acked / args.seconds,
                    percentile(lat, 50) * 1e3,
                    percentile(lat, 99) * 1e3,
                    sum(tally.errors.values()),
                    f"CPU us/write: store {s_cpu:.0f}, gateways {g_cpu / n * 1e6:.0f}, clients "
                    f"{c_cpu / n * 1e6:.0f}; store at {store_cores:.2f} cores",
                )
            )
            print(
                f"  A {clients} clients: {rows[-1].writes_s:,.0f} writes/s, "
                f"p99 {rows[-1].p99:.1f} ms, {rows[-1].note}",
                flush=True,
            )
            if tally.errors:
                print(f"    errors: {dict(tally.errors)}")
        procs.stop()
    finally:
        for p in [procs.store, *procs.gateways]:
            if p.poll() is None:
                p.kill()
    # The SIGKILL run: a fresh set of processes on the same file.
    procs = Procs(tmp, 2, args.inflight, args.max_batch)
    try:
        clients = args.kill_clients
        tally = asyncio.run(
            drive(
                procs.ports,
                clients,
                pools,
                args.warmup,
                args.seconds,
                kill=(args.warmup + args.seconds / 2, 0),
                gateways=procs.gateways,
                offset=offset,
            )
        )
        procs.stop()
    finally:
        for p in [procs.store, *procs.gateways]:
            if p.poll() is None:
                p.kill()
    votes, lost = check_stored(tmp / "feedback.duckdb", tally.acked)
    all_votes, all_lost = check_stored(tmp / "feedback.duckdb", all_acked)
    print(f"  A rising-load runs: {all_votes:,} votes acknowledged, {all_lost} not in the file")
    lat = sorted(tally.latencies)
    rows.append(
        Row(
            "A, gateway 0 SIGKILLed half-way",
            f"{clients} over 2 gw",
            tally.window_acked / args.seconds,
            percentile(lat, 50) * 1e3,
            percentile(lat, 99) * 1e3,
            sum(tally.errors.values()),
            f"{votes:,} votes acknowledged, {lost} not in the file (lost); {tally.retried} writes "
            f"sent again to gateway 1 after the kill",
        )
    )
    print(f"  A kill run: {rows[-1].note}; errors {dict(tally.errors)}", flush=True)
    return rows


# ---- B: DuckLake --------------------------------------------------------------------------------


def ducklake_loadable(ext: str | None) -> str:
    """Whether the pinned duckdb (this interpreter's) loads ducklake: what happened."""
    import duckdb

    con = duckdb.connect(config={"allow_unsigned_extensions": True})
    out = [f"duckdb {duckdb.__version__}"]
    for sql in ("INSTALL ducklake", "LOAD ducklake") + ((f"LOAD '{ext}'",) if ext else ()):
        try:
            con.execute(sql)
            out.append(f"{sql}: ok")
            return "; ".join(out)
        except duckdb.Error as exc:
            out.append(f"{sql}: {str(exc).splitlines()[0][:160]}")
    return "; ".join(out)


def _lake(catalog: str, data: str, busy_ms: int = 5000) -> object:
    """A connection with the DuckLake attached as `lake` (the extensions from the interpreter's
    duckdb-extension-* packages, or the usual INSTALL/LOAD)."""
    import duckdb

    con = duckdb.connect(config={"allow_unsigned_extensions": True})
    for name in ("ducklake", "sqlite_scanner"):
        files = []
        with contextlib.suppress(ImportError):
            mod = __import__(f"duckdb_extension_{name}")
            files = glob.glob(
                f"{os.path.dirname(mod.__file__)}/**/*.duckdb_extension", recursive=True
            )
        con.execute(f"LOAD '{files[0]}'" if files else f"LOAD {name}")
    con.execute(
        f"ATTACH 'ducklake:sqlite:{catalog}' AS lake (DATA_PATH '{data}', "
        f"META_JOURNAL_MODE 'WAL', META_BUSY_TIMEOUT {busy_ms})"
    )
    return con


LAKE_COLS = (
    "id BIGINT, response_id BIGINT, value INTEGER, score INTEGER, reason VARCHAR, "
    "rater_id VARCHAR, item VARCHAR, kind VARCHAR, gateway INTEGER, created_at TIMESTAMP"
)


def run_ducklake_setup(catalog: str, data: str) -> None:
    con = _lake(catalog, data)
    con.execute(f"CREATE TABLE IF NOT EXISTS lake.feedback ({LAKE_COLS})")
    print(json.dumps({"version": __import__("duckdb").__version__}))


def run_ducklake_count(catalog: str, data: str) -> None:
    con = _lake(catalog, data)
    ids = [r[0] for r in con.execute("SELECT id FROM lake.feedback").fetchall()]
    files = len(glob.glob(f"{data}/**/*.parquet", recursive=True))
    snaps = con.execute("SELECT count(*) FROM lake.snapshots()").fetchall()[0][0]
    print(json.dumps({"ids": ids, "parquet_files": files, "snapshots": snaps}))


def run_ducklake_writer(args: argparse.Namespace) -> None:
    """`--ducklake-threads` clients in one process, each needing its row committed; prints
    {"acked": [ids], "lat": [s], "window": n, "errors": {...}, "commits": n}."""
    con = _lake(args.catalog, args.data)
    start = time.perf_counter() + args.warmup
    end = start + args.seconds
    acked: list[int] = []
    lat: list[float] = []
    errors: Counter[str] = Counter()
    window = [0]
    commits = [0]
    lock = threading.Lock()
    sql = "INSERT INTO lake.feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)"

    def row(t: int, n: int) -> list:
        """A feedback-like row; its id says which process, thread and write it is."""
        key = (args.proc << 40) | (t << 28) | n
        return [key, n, 1, None, None, f"p{args.proc}t{t}", str(n), "thumbs", args.proc]

    q: queue.Queue = queue.Queue()
    retries = [0]

    def with_retries(cur, fn) -> None:
        """Run fn; a commit refused with SQLite's "database is locked" (the catalog's write lock,
        which the busy timeout does not always wait for) is rolled back and tried again."""
        for attempt in range(args.lock_retries + 1):
            try:
                fn()
                return
            except Exception as exc:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                if "locked" not in str(exc) or attempt == args.lock_retries:
                    raise
                with lock:
                    retries[0] += 1
                time.sleep(0.001 * (attempt + 1))

    def group_writer() -> None:
        cur = con.cursor()
        while True:
            first = q.get()
            if first is None:
                return
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 2048:
                    batch.append(q.get_nowait())
            cols = [list(c) for c in zip(*(r for r, _ in batch), strict=True)]

            def insert(cols=cols) -> None:
                cur.execute("BEGIN")
                cur.execute(
                    "INSERT INTO lake.feedback SELECT unnest($1), unnest($2), unnest($3), "
                    "unnest($4::INTEGER[]), unnest($5::VARCHAR[]), unnest($6), unnest($7), "
                    "unnest($8), unnest($9), now()::TIMESTAMP",
                    cols,
                )
                cur.execute("COMMIT")

            try:
                with_retries(cur, insert)
                commits[0] += 1
                outcome = None
            except Exception as exc:  # noqa: BLE001
                outcome = exc
            for _, ev in batch:
                ev.append(outcome)
                ev[0].set()

    def client(t: int) -> None:
        cur = con.cursor()
        n = 0
        while (now := time.perf_counter()) < end:
            r = row(t, n)
            n += 1
            try:
                if args.mode == "row":
                    with_retries(cur, lambda r=r: cur.execute(sql, r))
                    with lock:
                        commits[0] += 1
                else:
                    ev = [threading.Event()]
                    q.put((r, ev))
                    ev[0].wait()
                    if ev[1] is not None:
                        raise ev[1]
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors[f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"] += 1
                continue
            done = time.perf_counter()
            with lock:
                acked.append(r[0])
                if now >= start and done <= end:
                    window[0] += 1
                    lat.append(done - now)

    writer = threading.Thread(target=group_writer, daemon=True)
    if args.mode == "batch":
        writer.start()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(args.ducklake_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    q.put(None)
    if writer.is_alive():
        writer.join()
    print(
        json.dumps(
            {
                "acked": acked,
                "lat": lat,
                "window": window[0],
                "errors": errors,
                "commits": commits[0],
                "retries": retries[0],
            }
        ),
        flush=True,
    )
    os._exit(0)  # no interpreter teardown under DuckDB's threads


def ducklake_runs(args: argparse.Namespace, tmp: Path) -> list[Row]:
    py = args.ducklake_python
    me = [py, str(Path(__file__).resolve())]
    rows = []
    for procs, mode in [
        (int(p), m) for p in args.ducklake_procs.split(",") for m in ("row", "batch")
    ]:
        d = tmp / f"lake-{mode}-{procs}"
        d.mkdir()
        where = ["--catalog", str(d / "catalog.sqlite"), "--data", str(d / "data") + "/"]
        setup = subprocess.run(
            me + ["--role", "ducklake-setup", *where], capture_output=True, text=True, check=True
        )
        version = json.loads(setup.stdout)["version"]
        writers = [
            subprocess.Popen(
                me
                + [
                    "--role",
                    "ducklake-writer",
                    *where,
                    "--mode",
                    mode,
                    "--proc",
                    str(p),
                    "--seconds",
                    str(args.seconds),
                    "--warmup",
                    str(args.warmup),
                    "--ducklake-threads",
                    str(args.ducklake_threads),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in range(procs)
        ]
        outs = []
        for w in writers:
            out, err = w.communicate(timeout=args.warmup + args.seconds + 300)
            if w.returncode:
                raise RuntimeError(f"ducklake writer failed: {err[-2000:]}")
            outs.append(json.loads(out))
        count = json.loads(
            subprocess.run(
                me + ["--role", "ducklake-count", *where],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        acked = [i for o in outs for i in o["acked"]]
        lost = len(set(acked) - set(count["ids"]))
        lat = sorted(x for o in outs for x in o["lat"])
        errors = Counter()
        for o in outs:
            errors.update(o["errors"])
        commits = sum(o["commits"] for o in outs)
        retries = sum(o["retries"] for o in outs)
        rows.append(
            Row(
                f"B DuckLake (duckdb {version}, SQLite catalog), "
                + ("a commit per row" if mode == "row" else "group commit per process"),
                f"{procs * args.ducklake_threads} threads / {procs} proc{'s' if procs > 1 else ''}",
                sum(o["window"] for o in outs) / args.seconds,
                percentile(lat, 50) * 1e3,
                percentile(lat, 99) * 1e3,
                sum(errors.values()),
                f"{commits:,} commits for {len(acked):,} rows, {retries:,} retries after 'locked', "
                f"{count['snapshots']:,} snapshots, "
                f"{count['parquet_files']:,} parquet files; {lost} acknowledged rows missing",
            )
        )
        print(
            f"  B {mode} x{procs}: {rows[-1].writes_s:,.0f} rows/s, p99 {rows[-1].p99:.1f} ms, "
            f"{rows[-1].note}",
            flush=True,
        )
        if errors:
            print(f"    errors: {dict(errors.most_common(3))}")
    return rows


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--levels",
        default="32,64,128",
        help="client counts for the store process's runs (the ceiling)",
    )
    parser.add_argument("--kill-clients", type=int, default=32)
    parser.add_argument("--inflight", type=int, default=1, help="frames in flight per gateway")
    parser.add_argument("--max-batch", type=int, default=1024, help="writes per frame at most")
    parser.add_argument("--ducklake-python", help="interpreter whose duckdb loads ducklake")
    parser.add_argument("--ducklake-ext", help="a local ducklake.duckdb_extension to try")
    parser.add_argument("--ducklake-threads", type=int, default=16, help="clients per process")
    parser.add_argument(
        "--ducklake-procs",
        default="2,1",
        help="writer processes per DuckLake run (1: no cross-process contention)",
    )
    parser.add_argument(
        "--lock-retries",
        type=int,
        default=50,
        help="DuckLake: tries again after 'database is locked', at most",
    )
    parser.add_argument("--skip-store", action="store_true")
    # child roles
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    for name in ("--db", "--sock", "--port-file", "--catalog", "--data", "--mode"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--proc", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role == "store":
        run_store(Path(args.db), Path(args.sock))
        return 0
    if args.role == "gateway":
        run_gateway(Path(args.sock), Path(args.port_file), args.inflight, args.max_batch)
        return 0
    if args.role == "ducklake-setup":
        run_ducklake_setup(args.catalog, args.data)
        return 0
    if args.role == "ducklake-writer":
        run_ducklake_writer(args)
        return 0
    if args.role == "ducklake-count":
        run_ducklake_count(args.catalog, args.data)
        return 0

    args.levels = [int(x) for x in args.levels.split(",")]
    print(
        f"cpus: {os.cpu_count()}  load average: {os.getloadavg()[0]:.2f}  window "
        f"{args.seconds:g} s after {args.warmup:g} s warm-up"
    )
    print(f"DuckLake in the pinned duckdb: {ducklake_loadable(args.ducklake_ext)}", flush=True)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-gateways-"))
    try:
        if not args.skip_store:
            rows += store_runs(args, tmp)
        if args.ducklake_python:
            rows += ducklake_runs(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| option | clients | acknowledged writes/s | p50 ms | p99 ms | errors | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.option} | {r.clients} | {r.writes_s:,.0f} | {r.p50:.1f} | {r.p99:.1f} | "
            f"{r.errors} | {r.note} |"
        )
    kill = [r for r in rows if "SIGKILL" in r.option]
    if kill:
        ok = kill[0].writes_s >= GOAL_WRITES_PER_S and " 0 not in the file" in kill[0].note
        print(
            f"\ngoal (>= {GOAL_WRITES_PER_S:,.0f} acknowledged writes/s with 32 clients over "
            f"both gateways, 0 lost when one is SIGKILLed): {'met' if ok else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
