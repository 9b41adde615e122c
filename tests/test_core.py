"""core/: the concurrency helpers every request relies on and the settings read from the
environment (no models needed)."""

from __future__ import annotations

import base64
import gc
import os
import threading
import time
import unittest
import weakref
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import grpc

from core.concurrency import Budget, InstancePool, run_side_by_side, serving_alone, serving_request
from core.process import WhenIdle
from core.settings import ImageLimits, Settings


class WhenIdleTest(unittest.TestCase):
    """WhenIdle, which returns memory once requests stop (face_service.IDLE_RETURN_SECONDS)."""

    QUIET = 0.1

    def setUp(self) -> None:
        self.calls: list[float] = []
        self.idle = WhenIdle(lambda: self.calls.append(time.monotonic()), self.QUIET)

    def wait_for_calls(self, count: int, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def test_runs_once_after_the_quiet_period(self) -> None:
        self.idle.started()
        self.idle.ended()
        ended = time.monotonic()
        self.wait_for_calls(1)
        self.assertEqual(len(self.calls), 1)
        self.assertGreaterEqual(self.calls[0] - ended, self.QUIET * 0.9)
        time.sleep(3 * self.QUIET)
        self.assertEqual(len(self.calls), 1, "ran again without another request")
        self.idle.started()
        self.idle.ended()
        self.wait_for_calls(2)
        self.assertEqual(len(self.calls), 2)

    def test_never_while_a_request_is_in_flight(self) -> None:
        self.idle.started()
        self.idle.started()
        self.idle.ended()  # one of two ends: still busy
        time.sleep(4 * self.QUIET)
        self.assertEqual(self.calls, [])
        self.idle.ended()
        self.wait_for_calls(1)
        self.assertEqual(len(self.calls), 1)

    def test_requests_back_to_back_postpone_it(self) -> None:
        for _ in range(6):
            self.idle.started()
            time.sleep(self.QUIET / 4)
            self.idle.ended()
        self.assertEqual(self.calls, [])
        self.wait_for_calls(1)
        self.assertEqual(len(self.calls), 1)

    def test_a_failing_action_does_not_stop_later_ones(self) -> None:
        failures = []

        def action() -> None:
            failures.append(1)
            if len(failures) == 1:
                raise RuntimeError("first return failed")

        idle = WhenIdle(action, self.QUIET)
        with self.assertLogs("face-backend", level="ERROR"):
            idle.started()
            idle.ended()
            deadline = time.monotonic() + 5
            while not failures and time.monotonic() < deadline:
                time.sleep(0.01)
        idle.started()
        idle.ended()
        deadline = time.monotonic() + 5
        while len(failures) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(failures), 2)


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
        self.assertEqual(
            run_side_by_side(self.helpers, threading.current_thread, threading.current_thread), (here, here)
        )

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

    def test_an_error_of_second_frees_what_its_frames_held_without_a_garbage_collection(self) -> None:
        # A request's images and model sit in the frames of second's traceback; a reference cycle
        # through the future would keep them until a collection happens to run (issue 14: RSS
        # climbing with every reload until one did).
        class Image:
            pass

        second_started = threading.Event()
        held: list[weakref.ref] = []

        def second():
            image = Image()
            held.append(weakref.ref(image))
            second_started.set()
            raise ValueError("no face in img2")

        gc.disable()
        self.addCleanup(gc.enable)
        try:  # not assertRaises: it clears the traceback's frames, which would hide a cycle
            run_side_by_side(self.helpers, lambda: second_started.wait(10), second)
        except ValueError:
            pass
        self.assertEqual(len(held), 1)
        # The helper thread drops its own reference to the finished work item a moment after
        # handing over the error: wait for that, never for a collection (disabled here).
        deadline = time.monotonic() + 5.0
        while held[0]() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertIsNone(held[0]())

    def test_without_helpers_or_after_shutdown_both_run_here_in_order(self):
        order = []
        first = lambda: order.append("first") or threading.current_thread()
        second = lambda: order.append("second") or threading.current_thread()
        here = threading.current_thread()
        self.assertEqual(run_side_by_side(None, first, second), (here, here))
        self.helpers.shutdown()
        self.assertEqual(run_side_by_side(self.helpers, first, second), (here, here))
        self.assertEqual(order, ["first", "second"] * 2)


class InstancePoolTest(unittest.TestCase):
    """The pool OpenCV's model objects are lent from, and how closing it lets them go."""

    def test_lends_one_instance_per_borrower_up_to_its_size(self):
        made = []
        pool = InstancePool(lambda: made.append(object()) or made[-1], size=2)
        self.assertEqual((len(made), pool.idle), (1, 1))  # the first one at once
        with pool.borrow() as a, pool.borrow() as b:
            self.assertIsNot(a, b)
            self.assertEqual((len(made), pool.idle), (2, 0))
            served = threading.Event()

            def third_borrower():
                with pool.borrow():
                    served.set()

            waiter = threading.Thread(target=third_borrower)
            waiter.start()
            self.assertFalse(served.wait(0.2), "a third borrower got an instance from a pool of two")
        waiter.join(5)
        self.assertTrue(served.is_set())
        self.assertEqual(len(made), 2)

    def test_close_drops_idle_and_returned_instances(self):
        pool = InstancePool(object, size=2)
        with pool.borrow():
            with pool.borrow():
                pass
            pool.close()
            self.assertEqual(pool.idle, 0)
        self.assertEqual(pool.idle, 0, "an instance lent before close came back into the pool")
        with self.assertRaisesRegex(RuntimeError, "closed"):
            with pool.borrow():
                pass


class ServingAloneTest(unittest.TestCase):
    """The count of requests being served that models read to pick their threads."""

    def test_alone_up_to_one_request_and_again_once_others_end(self):
        self.assertTrue(serving_alone())
        with serving_request():
            self.assertTrue(serving_alone())
            with serving_request():
                self.assertFalse(serving_alone())
            self.assertTrue(serving_alone())

    def test_a_request_that_fails_still_ends(self):
        with serving_request():
            with self.assertRaises(ValueError), serving_request():
                raise ValueError("bad image")
            self.assertTrue(serving_alone())

    def test_requests_on_other_threads_count(self):
        inside, leave = threading.Event(), threading.Event()
        self.addCleanup(leave.set)

        def other_request():
            with serving_request():
                inside.set()
                leave.wait(10)

        thread = threading.Thread(target=other_request)
        thread.start()
        self.assertTrue(inside.wait(10))
        with serving_request():
            self.assertFalse(serving_alone())
        leave.set()
        thread.join(10)
        with serving_request():
            self.assertTrue(serving_alone())


class BudgetTest(unittest.TestCase):
    """The memory budget JPEG decodes share (imaging.COEFFICIENT_BUDGET_BYTES)."""

    class Taker:
        """A thread in budget.taking(amount) until released; `inside` is set once it entered."""

        def __init__(self, test: unittest.TestCase, budget: Budget, amount: int) -> None:
            self.inside, self.release = threading.Event(), threading.Event()
            test.addCleanup(self.release.set)

            def take() -> None:
                with budget.taking(amount):
                    self.inside.set()
                    self.release.wait(10)

            self.thread = threading.Thread(target=take)
            self.thread.start()

        def leave(self) -> None:
            self.release.set()
            self.thread.join(10)

    def queued(self, budget: Budget, count: int) -> None:
        """Waits until `count` takers wait in line (they have not entered, by construction)."""
        deadline = time.monotonic() + 10
        while len(budget._waiting) < count:
            self.assertLess(time.monotonic(), deadline, "a taker never got in line")
            time.sleep(0.001)

    def test_amounts_that_fit_run_together_and_the_rest_wait(self):
        budget = Budget(40)
        a, b = self.Taker(self, budget, 20), self.Taker(self, budget, 20)
        self.assertTrue(a.inside.wait(10) and b.inside.wait(10))
        self.assertEqual(budget.taken, 40)
        c = self.Taker(self, budget, 1)
        self.queued(budget, 1)
        self.assertFalse(c.inside.is_set())
        a.leave()
        self.assertTrue(c.inside.wait(10))
        self.assertEqual(budget.taken, 21)
        b.leave()
        c.leave()
        self.assertEqual(budget.taken, 0)

    def test_more_than_the_limit_runs_alone(self):
        budget = Budget(40)
        small = self.Taker(self, budget, 10)
        self.assertTrue(small.inside.wait(10))
        big = self.Taker(self, budget, 100)
        self.queued(budget, 1)
        self.assertFalse(big.inside.is_set())
        small.leave()
        self.assertTrue(big.inside.wait(10), "an amount over the limit never ran")
        after = self.Taker(self, budget, 1)
        self.queued(budget, 1)
        self.assertFalse(after.inside.is_set())
        big.leave()
        self.assertTrue(after.inside.wait(10))
        after.leave()

    def test_takers_enter_in_the_order_they_asked(self):
        budget = Budget(40)
        first = self.Taker(self, budget, 30)
        self.assertTrue(first.inside.wait(10))
        second = self.Taker(self, budget, 30)
        self.queued(budget, 1)
        third = self.Taker(self, budget, 5)  # would fit beside the first, but the second asked before
        self.queued(budget, 2)
        self.assertFalse(third.inside.is_set())
        first.leave()
        self.assertTrue(second.inside.wait(10) and third.inside.wait(10))
        self.assertEqual(budget.taken, 35)
        second.leave()
        third.leave()

    def test_nothing_never_waits_and_an_error_gives_the_amount_back(self):
        budget = Budget(40)
        holder = self.Taker(self, budget, 40)
        self.assertTrue(holder.inside.wait(10))
        queued = self.Taker(self, budget, 10)
        self.queued(budget, 1)
        with budget.taking(0):
            self.assertEqual((budget.taken, len(budget._waiting)), (40, 1))
        holder.leave()
        self.assertTrue(queued.inside.wait(10))
        queued.leave()
        with self.assertRaises(ValueError), budget.taking(15):
            raise ValueError("undecodable")
        self.assertEqual(budget.taken, 0)


class SettingsTest(unittest.TestCase):
    """Settings.from_environ: every variable the server reads, with the defaults it had."""

    def test_an_empty_environment_gives_the_defaults(self):
        self.assertEqual(Settings.from_environ({}), Settings())
        defaults = Settings()
        self.assertEqual(
            (
                defaults.auth_token,
                defaults.max_workers,
                defaults.max_concurrent_rpcs,
                defaults.shutdown_grace_seconds,
                defaults.parent_watch_interval,
            ),
            ("", None, None, 10.0, 2.0),
        )
        self.assertEqual(defaults.image_limits, ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=50_000_000))

    def test_the_message_cap_carries_two_images_and_fits_grpc(self):
        base64_image = len(base64.b64encode(bytes(ImageLimits().max_bytes)))
        self.assertEqual(ImageLimits().max_base64_chars(), base64_image)
        self.assertGreaterEqual(ImageLimits().message_bytes(), 2 * base64_image)
        self.assertEqual(ImageLimits(max_bytes=1000).message_bytes(), 50 * 1024 * 1024)  # the Stores RPCs
        # However large the image limit, the options are ints gRPC takes: the server starts.
        huge = ImageLimits(max_bytes=2**40)
        self.assertEqual(huge.message_bytes(), 2**31 - 1)
        server = grpc.server(ThreadPoolExecutor(max_workers=1), options=huge.grpc_message_options())
        server.stop(None)

    def test_every_variable_is_read(self):
        settings = Settings.from_environ(
            {
                "LOCALAI_GRPC_AUTH_TOKEN": "t0ken",
                "PYTHON_GRPC_MAX_WORKERS": "3",
                "PYTHON_GRPC_MAX_CONCURRENT_RPCS": "5",
                "FACE_SHUTDOWN_GRACE_SECONDS": "1.5",
                "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "500ms",
                "FACE_MAX_IMAGE_BYTES": "1000",
                "FACE_MAX_IMAGE_PIXELS": "2000",
            }
        )
        self.assertEqual(
            settings,
            Settings(
                auth_token="t0ken",
                max_workers=3,
                max_concurrent_rpcs=5,
                shutdown_grace_seconds=1.5,
                parent_watch_interval=0.5,
                image_limits=ImageLimits(max_bytes=1000, max_pixels=2000),
            ),
        )

    def test_parent_watch_interval_as_the_host_writes_it(self):
        cases = {
            ("", ""): 2.0,
            ("", "2s"): 2.0,
            ("", "1m"): 60.0,
            ("", "250ms"): 0.25,
            ("", "3"): 3.0,
            ("", "1ms"): 0.05,
            ("", "soon"): 2.0,
            ("true", "1s"): 1.0,
            ("false", "1s"): None,
            ("0", ""): None,
            ("OFF", ""): None,
            (" no ", ""): None,
        }
        for (enabled, interval), expected in cases.items():
            with self.subTest(enabled=enabled, interval=interval):
                settings = Settings.from_environ(
                    {"LOCALAI_BACKEND_PARENT_WATCH": enabled, "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": interval}
                )
                self.assertEqual(settings.parent_watch_interval, expected)

    def test_malformed_numbers(self):
        for name in ("PYTHON_GRPC_MAX_WORKERS", "PYTHON_GRPC_MAX_CONCURRENT_RPCS", "FACE_SHUTDOWN_GRACE_SECONDS"):
            with self.subTest(name), self.assertRaisesRegex(ValueError, name):
                Settings.from_environ({name: "many"})
        # The image limits keep their defaults, as they always have; numbers below 1 become 1.
        settings = Settings.from_environ(
            {"FACE_MAX_IMAGE_BYTES": "big", "FACE_MAX_IMAGE_PIXELS": "0", "PYTHON_GRPC_MAX_WORKERS": "-4"}
        )
        self.assertEqual(settings.image_limits, ImageLimits(max_pixels=1))
        self.assertEqual(settings.max_workers, 1)

    def test_the_process_environment_is_read_when_asked_not_before(self):
        with mock.patch.dict(os.environ, {"LOCALAI_GRPC_AUTH_TOKEN": "from-env"}):
            self.assertEqual(Settings.from_environ().auth_token, "from-env")
        with mock.patch.dict(os.environ, {"LOCALAI_GRPC_AUTH_TOKEN": ""}):
            self.assertEqual(Settings.from_environ().auth_token, "")
