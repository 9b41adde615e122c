"""Domain errors. The gRPC layer maps each class to one status code, in one place (backend.py),
and sends each error's `reason` and `field` with it as a google.rpc.ErrorInfo."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a call failed, for programs to branch on (the message is for people, and stays as it
    is). The value is the wire name: ErrorInfo.reason, UPPER_SNAKE_CASE."""

    NO_MODEL_LOADED = "NO_MODEL_LOADED"  # call LoadModel first
    IDENTITY_MISMATCH = "IDENTITY_MISMATCH"  # ModelIdentity names another model than the loaded one
    LIVENESS_WEIGHTS_MISSING = "LIVENESS_WEIGHTS_MISSING"  # anti_spoofing, but no liveness model loaded
    BAD_ACTION = "BAD_ACTION"  # a word outside the host's four actions
    BAD_THRESHOLD = "BAD_THRESHOLD"  # out of range or not a number
    IMAGE_MISSING = "IMAGE_MISSING"  # empty, or no image in the list
    IMAGE_NOT_BASE64 = "IMAGE_NOT_BASE64"  # not base64, or a malformed data URI
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"  # bytes, pixels or a side over the limit
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"  # a side too short to hold a face
    IMAGE_FORMAT_UNSUPPORTED = "IMAGE_FORMAT_UNSUPPORTED"  # a readable header of another format
    IMAGE_UNDECODABLE = "IMAGE_UNDECODABLE"  # no readable header, or corrupt or truncated data
    NO_FACE = "NO_FACE"  # the image decoded, the detector found no face in it
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the caller's deadline passed between two stages
    CANCELLED = "CANCELLED"  # the caller went away between two stages
    BAD_TOKEN = "BAD_TOKEN"  # the bearer token is missing or wrong
    INTERNAL = "INTERNAL"  # a bug; the server logged it
    # The store role (LoadModel with store:sqlite or store:postgres) and the RPCs of each role.
    LOADED_MODEL_IS_STORE = "LOADED_MODEL_IS_STORE"  # a face RPC, but the loaded model is a store
    LOADED_MODEL_IS_NOT_STORE = "LOADED_MODEL_IS_NOT_STORE"  # a Stores RPC, but a face model is loaded
    KEY_INVALID = "KEY_INVALID"  # a store key that is empty or holds NaN or infinity
    KEY_DIMENSION_MISMATCH = "KEY_DIMENSION_MISMATCH"  # a store key of another length than the stored ones
    BAD_STORE_REQUEST = "BAD_STORE_REQUEST"  # no keys, keys and values of different counts, TopK < 1
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the store's database cannot be reached or failed
    # LoadModel errors: never on the wire (LoadModel answers Result(success=false) with the
    # message), kept so every domain error has a reason for code and logs to branch on.
    MODEL_FILE_INVALID = "MODEL_FILE_INVALID"
    BAD_MODEL_OPTION = "BAD_MODEL_OPTION"


class FaceServiceError(Exception):
    """Base class: the message is safe to show to the caller.

    `reason` says why (a Reason, or its name) and `field` which request field was at fault
    (img1, threshold, ModelIdentity, ...; empty when none was). A class with one reason for all
    its errors sets it as a class attribute; the others take one per raise.
    """

    reason: Reason

    def __init__(self, message: str, *, reason: Reason | str | None = None, field: str = ""):
        super().__init__(message)
        if reason is not None:
            self.reason = Reason(reason)  # a misspelt reason fails here, not on the wire
        elif not hasattr(self, "reason"):
            raise TypeError(f"{type(self).__name__} needs a reason")
        self.field = field


class InvalidInputError(FaceServiceError):
    """The caller sent something it must fix (INVALID_ARGUMENT)."""


class NoFaceError(FaceServiceError):
    """No face was found in the named image (NOT_FOUND)."""

    reason = Reason.NO_FACE


class IdentityMismatchError(FaceServiceError):
    """The request names a model other than the loaded one (NOT_FOUND)."""

    reason = Reason.IDENTITY_MISMATCH


class PreconditionError(FaceServiceError):
    """The loaded model cannot do what was asked, or none is loaded (FAILED_PRECONDITION)."""


class ModelFileError(FaceServiceError):
    """A configured model file is missing, corrupt or of the wrong kind (LoadModel fails)."""

    reason = Reason.MODEL_FILE_INVALID


class ModelOptionError(FaceServiceError):
    """A LoadModel option is unknown or malformed (LoadModel fails)."""

    reason = Reason.BAD_MODEL_OPTION


class StoreUnavailableError(FaceServiceError):
    """The store's database cannot be reached or failed the write (UNAVAILABLE: worth a retry)."""

    reason = Reason.STORE_UNAVAILABLE


class CallEndedError(FaceServiceError):
    """The caller cancelled or its deadline passed; the request stopped between stages."""

    def __init__(self, message: str, deadline_exceeded: bool):
        super().__init__(message, reason=Reason.DEADLINE_EXCEEDED if deadline_exceeded else Reason.CANCELLED)
        self.deadline_exceeded = deadline_exceeded
