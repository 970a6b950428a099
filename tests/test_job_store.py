"""Background job records in SQLite: life cycle, cancel, expiry, several stores and threads."""

import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from nnunet_bento.job_store import JobRecord, JobStore

TTL_S = 3600.0
RESULT = {"nifti_prediction": ["stage_0/prediction.nii.gz"]}


class FakeClock:
    """Epoch seconds that a test moves on by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> JobStore:
    return JobStore(tmp_path / "work" / "jobs.sqlite", TTL_S, clock=clock)


def run_job(store: JobStore, n_stages: int = 2) -> JobRecord:
    """A job through its whole life: created, started, every step of every stage, finished."""
    job = store.create("infer")
    assert store.start(job.job_id)
    for stage in range(n_stages):
        for step in ("read", "predict", "postprocess", "export"):
            store.progress(job.job_id, stage, n_stages, step)
    assert store.finish(job.job_id, RESULT)
    return job


def test_life_cycle_queued_running_done_with_progress(store: JobStore, clock: FakeClock) -> None:
    job = store.create("upload")
    assert (job.status, job.kind, job.created, job.stage, job.step) == (
        "queued",
        "upload",
        clock.now,
        None,
        None,
    )
    assert store.get(job.job_id) == job
    clock.now += 1
    assert store.start(job.job_id)
    running = store.get(job.job_id)
    assert (running.status, running.started) == ("running", clock.now)
    store.progress(job.job_id, 1, 2, "predict")
    running = store.get(job.job_id)
    assert (running.stage, running.n_stages, running.step) == (1, 2, "predict")
    assert not store.is_cancelled(job.job_id)
    clock.now += 5
    assert store.finish(job.job_id, RESULT, "/srv/work/jobs/result.zip")
    done = store.get(job.job_id)
    assert (done.status, done.finished, done.error) == ("done", clock.now, None)
    assert (done.result_json, done.result_file) == (RESULT, "/srv/work/jobs/result.zip")
    assert (done.stage, done.step) == (1, "predict")


def test_a_job_starts_once(store: JobStore) -> None:
    job = store.create("infer")
    assert store.start(job.job_id)
    assert not store.start(job.job_id)


def test_progress_of_a_job_that_is_not_running_is_ignored(store: JobStore) -> None:
    job = store.create("infer")
    store.progress(job.job_id, 0, 1, "read")
    assert store.get(job.job_id).step is None


def test_fail_records_the_error_and_its_status(store: JobStore, clock: FakeClock) -> None:
    job = store.create("infer")
    store.start(job.job_id)
    clock.now += 2
    store.fail(job.job_id, "series 'T2' not found in the study", 404)
    failed = store.get(job.job_id)
    assert (failed.status, failed.error, failed.status_code) == (
        "failed",
        "series 'T2' not found in the study",
        404,
    )
    assert (failed.finished, failed.result_json) == (clock.now, None)
    assert not store.finish(job.job_id, RESULT)
    assert store.get(job.job_id).status == "failed"


def test_a_queued_job_may_fail(store: JobStore) -> None:
    job = store.create("upload")
    store.fail(job.job_id, "the archive is empty", 400)
    assert store.get(job.job_id).status == "failed"
    assert not store.start(job.job_id)


def test_cancel_while_queued_stops_the_start(store: JobStore, clock: FakeClock) -> None:
    job = store.create("infer")
    cancelled = store.cancel(job.job_id)
    assert (cancelled.status, cancelled.finished) == ("cancelled", clock.now)
    assert store.is_cancelled(job.job_id)
    assert not store.start(job.job_id)
    assert store.get(job.job_id).status == "cancelled"


def test_cancel_while_running_discards_the_result(store: JobStore) -> None:
    job = store.create("upload")
    store.start(job.job_id)
    store.progress(job.job_id, 0, 1, "predict")
    assert store.cancel(job.job_id).status == "cancelled"
    assert store.is_cancelled(job.job_id)
    assert not store.finish(job.job_id, RESULT, "/srv/work/jobs/result.zip")
    store.fail(job.job_id, "stopped", 500)
    record = store.get(job.job_id)
    assert (record.status, record.result_json, record.result_file, record.error) == (
        "cancelled",
        None,
        None,
        None,
    )


def test_cancel_leaves_done_and_failed_jobs_as_they_are(store: JobStore) -> None:
    done = run_job(store)
    failed = store.create("infer")
    store.fail(failed.job_id, "boom", 500)
    assert store.cancel(done.job_id) == store.get(done.job_id)
    assert store.get(done.job_id).status == "done"
    assert store.cancel(failed.job_id).status == "failed"


def test_unknown_id_is_none(store: JobStore) -> None:
    assert store.get("no-such-job") is None
    assert store.cancel("no-such-job") is None
    assert not store.start("no-such-job")
    assert not store.finish("no-such-job", RESULT)
    assert store.is_cancelled("no-such-job")


def test_ids_are_random_and_url_safe(store: JobStore) -> None:
    ids = {store.create("infer").job_id for _ in range(50)}
    assert len(ids) == 50
    assert all(
        len(job_id) >= 21 and job_id.replace("-", "").replace("_", "").isalnum() for job_id in ids
    )


def test_an_unknown_kind_is_refused_by_the_table(store: JobStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.create("train")


def test_expire_deletes_records_finished_past_the_ttl(store: JobStore, clock: FakeClock) -> None:
    finished = clock.now
    old = store.create("upload")
    store.start(old.job_id)
    store.finish(old.job_id, RESULT, "/srv/work/jobs/old.zip")
    cancelled = store.create("infer")
    store.cancel(cancelled.job_id)
    queued = store.create("infer")
    running = store.create("infer")
    store.start(running.job_id)
    clock.now += 100
    recent = run_job(store)

    assert store.expire(now=finished + TTL_S) == []
    expired = store.expire(now=finished + TTL_S + 1)
    assert [(record.job_id, record.result_file) for record in expired] == [
        (old.job_id, "/srv/work/jobs/old.zip"),
        (cancelled.job_id, None),
    ]
    assert store.get(old.job_id) is None and store.get(cancelled.job_id) is None
    assert store.get(queued.job_id).status == "queued"
    assert store.get(running.job_id).status == "running"
    assert store.get(recent.job_id).status == "done"
    assert store.expire(now=finished + TTL_S + 1) == []


def test_a_record_past_its_ttl_is_gone_before_expire_runs(
    store: JobStore, clock: FakeClock
) -> None:
    job = run_job(store)
    clock.now += TTL_S
    assert store.get(job.job_id) is not None
    clock.now += 1
    assert store.get(job.job_id) is None
    assert store.cancel(job.job_id) is None
    assert [record.job_id for record in store.expire()] == [job.job_id]


def test_to_public_gives_state_and_iso_times_never_server_paths(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.create("upload")
    store.start(job.job_id)
    store.progress(job.job_id, 1, 2, "export")
    public = store.get(job.job_id).to_public()
    assert public["stage"] == {"index": 1, "count": 2}
    assert public["step"] == "export"
    assert datetime.fromisoformat(public["started"]).timestamp() == clock.now
    assert public["finished"] is None

    store.finish(job.job_id, {"nifti_prediction": ["/data/out/stage_0/p.nii.gz"]}, "/srv/w/r.zip")
    public = store.get(job.job_id).to_public()
    assert set(public) == {
        "job_id",
        "kind",
        "status",
        "stage",
        "step",
        "created",
        "started",
        "finished",
        "error",
        "status_code",
        "source",
        "notifications",
    }
    assert (public["job_id"], public["status"]) == (job.job_id, "done")
    assert public["created"].endswith("+00:00")
    text = json.dumps(public)
    assert "/srv" not in text and "/data" not in text and "r.zip" not in text


def test_to_public_of_a_queued_job_has_no_stage(store: JobStore) -> None:
    public = store.create("infer").to_public()
    assert (public["status"], public["stage"], public["step"], public["started"]) == (
        "queued",
        None,
        None,
        None,
    )


def test_the_file_is_in_wal_mode(store: JobStore) -> None:
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_two_stores_on_one_file_see_each_others_records(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    first, second = JobStore(path, TTL_S), JobStore(path, TTL_S)
    job = first.create("infer")
    assert second.start(job.job_id)
    second.progress(job.job_id, 0, 1, "predict")
    assert first.get(job.job_id).step == "predict"
    assert first.cancel(job.job_id).status == "cancelled"
    assert second.is_cancelled(job.job_id)
    assert not second.finish(job.job_id, RESULT)


def test_stores_opened_at_once_on_a_new_file_do_not_collide(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    barrier = threading.Barrier(8)

    def open_store() -> str:
        barrier.wait()
        return JobStore(path, TTL_S).create("infer").job_id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: open_store(), range(8)))
    assert all(JobStore(path, TTL_S).get(job_id) for job_id in ids)


def test_concurrent_updates_from_threads_do_not_lock(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    stores = [JobStore(path, TTL_S) for _ in range(2)]

    def work(index: int) -> str:
        store = stores[index % 2]
        job = run_job(store, n_stages=3)
        store.expire()
        assert store.get(job.job_id).status == "done"
        return job.job_id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(work, range(200)))
    assert {stores[0].get(job_id).status for job_id in ids} == {"done"}


WORKER = """
import sys
from pathlib import Path
from nnunet_bento.job_store import JobStore

store = JobStore(Path(sys.argv[1]), 3600.0)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(50):
    job = store.create("upload")
    assert store.start(job.job_id)
    for stage in range(2):
        for step in ("read", "predict", "postprocess", "export"):
            store.progress(job.job_id, stage, 2, step)
            assert not store.is_cancelled(job.job_id)
    assert store.finish(job.job_id, {"stage": 2})
    store.expire()
    print(job.job_id)
"""


def test_concurrent_updates_from_processes_do_not_lock(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    assert [worker.stdout.readline() for worker in workers] == ["ready\n"] * 4
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    ids = [line for worker in workers for line in worker.communicate(timeout=120)[0].split()]
    assert [worker.returncode for worker in workers] == [0] * 4
    store = JobStore(path, TTL_S)
    assert len(set(ids)) == 200
    assert {store.get(job_id).status for job_id in ids} == {"done"}


def test_a_forked_child_opens_its_own_connection(store: JobStore) -> None:
    job = store.create("infer")
    child = multiprocessing.get_context("fork").Process(target=store.start, args=(job.job_id,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert store.get(job.job_id).status == "running"


def test_a_restart_fails_the_running_jobs_and_keeps_what_jobs_hold(tmp_path):
    path = tmp_path / "work" / "jobs.sqlite"
    before = JobStore(path, TTL_S)
    running = before.create("upload", tmp_path / "work" / "uploads" / "a").job_id
    before.start(running)
    queued = before.create("upload", tmp_path / "work" / "uploads" / "b").job_id
    done = before.create("infer").job_id
    before.start(done)
    before.finish(done, {}, str(tmp_path / "work" / "uploads" / "c" / "result.zip"))
    after = JobStore(path, TTL_S)
    (interrupted,) = after.fail_interrupted()
    assert interrupted.job_id == running and interrupted.status == "failed"
    assert "interrupted by a restart" in (after.get(running).error or "")
    assert after.get(queued).status == "queued"
    assert after.folders_in_use() == {
        tmp_path / "work" / "uploads" / "b",
        tmp_path / "work" / "uploads" / "c",
    }


def test_a_file_of_the_earlier_schema_gains_the_new_column(tmp_path):
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL,"
            " stage INTEGER, n_stages INTEGER, step TEXT, created REAL NOT NULL, started REAL,"
            " finished REAL, error TEXT, status_code INTEGER, result_json TEXT, result_file TEXT)"
        )
    store = JobStore(path, TTL_S)
    record = store.create("upload", tmp_path / "uploads" / "x")
    assert store.get(record.job_id).input_folder == str(tmp_path / "uploads" / "x")
    assert store.get(record.job_id).source == "api", "an earlier job came from the API"


def test_a_listing_pages_newest_first_with_filters(store: JobStore, clock: FakeClock) -> None:
    made = []
    for index in range(5):
        clock.now += 1
        made.append(store.create("infer", source="listener" if index % 2 else "api"))
    store.start(made[3].job_id)
    first = store.page(limit=2)
    assert [r.job_id for r in first.records] == [made[4].job_id, made[3].job_id]
    second = store.page(limit=2, after=first.next)
    third = store.page(limit=2, after=second.next)
    assert [r.job_id for r in second.records + third.records] == [
        made[2].job_id,
        made[1].job_id,
        made[0].job_id,
    ]
    assert third.next is None
    assert [r.job_id for r in store.page(source="listener").records] == [
        made[3].job_id,
        made[1].job_id,
    ]
    assert [r.job_id for r in store.page(status="running").records] == [made[3].job_id]
    with pytest.raises(ValueError, match="cursor"):
        store.page(after="not-a-cursor")


def test_a_listing_leaves_out_expired_jobs(store: JobStore, clock: FakeClock) -> None:
    old = run_job(store)
    clock.now += TTL_S + 1
    young = store.create("infer")
    assert [r.job_id for r in store.page().records] == [young.job_id]
    assert old.job_id not in {r.job_id for r in store.page(status="done").records}


def test_a_series_job_is_found_by_its_content_until_it_fails(store: JobStore) -> None:
    job = store.create("infer", source="listener")
    store.record_series("ct", "1.2.3", "hash-a", job.job_id)
    assert store.series_job("ct", "1.2.3", "hash-a") == job.job_id
    assert store.series_job("ct", "1.2.3", "hash-b") is None, "changed content"
    assert store.series_job("mr", "1.2.3", "hash-a") is None, "another route"
    store.fail(job.job_id, "model failed", 500)
    assert store.series_job("ct", "1.2.3", "hash-a") is None, "a failed job may run again"


def test_notifications_are_recorded_and_public(store: JobStore) -> None:
    job = run_job(store)
    results = [{"webhook": "ris", "delivered": True, "attempts": 2, "status": 200, "error": None}]
    store.notified(job.job_id, results)
    assert store.get(job.job_id).to_public()["notifications"] == results
