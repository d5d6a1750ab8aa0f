"""Per-file work over forked workers: results in order, whatever the number of processes,
and work done meanwhile in the calling process once the workers are running."""

import os
import threading

from pipeline import parallel


def _square_and_pid(item: int) -> tuple[int, int]:
    return item * item * parallel.context(), os.getpid()


def test_results_come_back_in_order_from_worker_processes():
    results = list(parallel.map_files(_square_and_pid, range(40), 1, processes=2))
    assert [value for value, _ in results] == [n * n for n in range(40)]
    assert os.getpid() not in {pid for _, pid in results}


def test_one_process_keeps_the_work_in_the_caller():
    results = list(parallel.map_files(_square_and_pid, range(5), 3, processes=1))
    assert results == [(3 * n * n, os.getpid()) for n in range(5)]


def test_work_meanwhile_runs_once_beside_the_workers_and_is_done_on_return():
    ran: list[str] = []
    results = list(
        parallel.map_files(
            _square_and_pid,
            range(40),
            1,
            processes=2,
            meanwhile=lambda: ran.append(threading.current_thread().name),
        )
    )
    assert len(results) == 40
    assert len(ran) == 1 and ran[0] != threading.main_thread().name


def test_work_meanwhile_that_fails_changes_nothing_and_one_process_skips_it():
    def fails() -> None:
        raise ImportError("not installed")

    assert len(list(parallel.map_files(_square_and_pid, range(8), 1, 2, meanwhile=fails))) == 8
    ran: list[int] = []
    list(parallel.map_files(_square_and_pid, range(8), 1, 1, meanwhile=lambda: ran.append(1)))
    assert ran == []
