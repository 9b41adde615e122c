"""The ErrorInfo reasons: the list in core/errors.py is well formed and documented, a raise
cannot name a reason that is not on it, and the paths no request can trigger on purpose (a bug,
a call that ended between stages) reach the wire with their reason. The reasons of the ordinary
errors are asserted where their status codes are (tests/test_grpc.py, tests/test_hardening.py)."""

from __future__ import annotations

import os
import re
import unittest
from unittest import mock

import grpc

import backend_pb2
from core.errors import (
    CallEndedError,
    IdentityMismatchError,
    InvalidInputError,
    ModelFileError,
    ModelOptionError,
    NoFaceError,
    PreconditionError,
    Reason,
)
from tests import support
from tests.support import GrpcAssertions

# google/rpc/error_details.proto: "[A-Z][A-Z0-9_]+[A-Z0-9]", at most 63 characters.
REASON_FORMAT = re.compile(r"[A-Z][A-Z0-9_]{0,61}[A-Z0-9]")


class ReasonListTest(unittest.TestCase):
    def test_every_reason_is_a_wire_name_and_in_the_readme(self):
        with open(os.path.join(support.REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for reason in Reason:
            with self.subTest(reason.name):
                self.assertEqual(reason.value, reason.name)
                self.assertRegex(reason.value, REASON_FORMAT)
                self.assertIn(f"`{reason.value}`", readme)

    def test_a_reason_is_checked_when_the_error_is_made(self):
        error = InvalidInputError("img1: no image data", reason="IMAGE_MISSING", field="img1")
        self.assertIs(error.reason, Reason.IMAGE_MISSING)
        self.assertEqual((str(error), error.field), ("img1: no image data", "img1"))
        with self.assertRaises(ValueError):
            InvalidInputError("x", reason="IMAGE_MISSSING")
        for kind in (InvalidInputError, PreconditionError):  # no one reason fits all their raises
            with self.subTest(kind.__name__), self.assertRaisesRegex(TypeError, "needs a reason"):
                kind("x")

    def test_classes_with_one_reason(self):
        self.assertIs(NoFaceError("no face found in img", field="img").reason, Reason.NO_FACE)
        self.assertIs(IdentityMismatchError("x").reason, Reason.IDENTITY_MISMATCH)
        self.assertIs(ModelFileError("x").reason, Reason.MODEL_FILE_INVALID)
        self.assertIs(ModelOptionError("x").reason, Reason.BAD_MODEL_OPTION)
        self.assertIs(CallEndedError("x", deadline_exceeded=True).reason, Reason.DEADLINE_EXCEEDED)
        self.assertIs(CallEndedError("x", deadline_exceeded=False).reason, Reason.CANCELLED)
        self.assertEqual(NoFaceError("x").field, "")


class UnplannedErrorsOverGrpcTest(GrpcAssertions, unittest.TestCase):
    """A bug and a call ended between stages, raised inside the service, seen by a real client."""

    @classmethod
    def setUpClass(cls):
        cls.serve()

    def detect_failing_with(self, error: Exception) -> grpc.RpcError:
        with (
            mock.patch.object(self.running.service, "detect", side_effect=error),
            self.assertRaises(grpc.RpcError) as caught,
        ):
            self.running.stub.Detect(backend_pb2.DetectOptions(src="x"), timeout=30)
        return caught.exception

    def test_a_bug_is_internal_with_no_field(self):
        with self.assertLogs("face-backend", "ERROR"):  # logged with its traceback, never sent
            error = self.detect_failing_with(RuntimeError("secret internals"))
        self.assertEqual(error.code(), grpc.StatusCode.INTERNAL)
        self.assertEqual(error.details(), "Detect: internal error")
        support.assert_error_info(self, error, "INTERNAL", "")

    def test_a_call_ended_between_stages(self):
        for deadline_exceeded, code in ((True, grpc.StatusCode.DEADLINE_EXCEEDED), (False, grpc.StatusCode.CANCELLED)):
            with self.subTest(code.name):
                error = self.detect_failing_with(CallEndedError("before detection", deadline_exceeded))
                self.assertEqual(error.code(), code)
                self.assertEqual(error.details(), "before detection")
                support.assert_error_info(self, error, code.name, "")


if __name__ == "__main__":
    unittest.main()
