"""core/: the concurrency helpers every request relies on (no models needed)."""
from __future__ import annotations

import threading
import unittest
from concurrent.futures import ThreadPoolExecutor

from core.concurrency import run_side_by_side


class RunSideBySideTest(unittest.TestCase):
    """run_side_by_side, which FaceVerify, FaceAnalyze and the liveness ensemble use."""

    def setUp(self):
        self.helpers = ThreadPoolExecutor(max_workers=1)
        self.addCleanup(self.helpers.shutdown)

    def test_second_runs_on_a_free_helper_while_first_runs_here(self):
        second_started = threading.Event()

        def second():
            second_started.set()
            return threading.current_thread()
        # first returns only once second is running elsewhere: both ran at the same time.
        first = lambda: (second_started.wait(10), threading.current_thread())
        (waited, first_thread), second_thread = run_side_by_side(self.helpers, first, second)
        self.assertTrue(waited)
        self.assertIs(first_thread, threading.current_thread())
        self.assertIsNot(second_thread, threading.current_thread())

    def test_second_runs_here_when_the_helper_is_busy(self):
        # No waiting in the helper's queue behind another request's work.
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.helpers.submit(gate.wait, 10)
        here = threading.current_thread()
        self.assertEqual(run_side_by_side(self.helpers, threading.current_thread, threading.current_thread),
                         (here, here))

    def test_first_error_wins_and_is_told_first(self):
        told = threading.Event()

        def second():
            raise ValueError("second")

        def first():
            raise KeyError("first")
        with self.assertRaises(KeyError):
            run_side_by_side(self.helpers, first, second, on_first_error=told.set)
        self.assertTrue(told.is_set())
        with self.assertRaises(ValueError):
            run_side_by_side(self.helpers, lambda: 1, second)

    def test_without_helpers_or_after_shutdown_both_run_here_in_order(self):
        order = []
        first = lambda: order.append("first") or threading.current_thread()
        second = lambda: order.append("second") or threading.current_thread()
        here = threading.current_thread()
        self.assertEqual(run_side_by_side(None, first, second), (here, here))
        self.helpers.shutdown()
        self.assertEqual(run_side_by_side(self.helpers, first, second), (here, here))
        self.assertEqual(order, ["first", "second"] * 2)
