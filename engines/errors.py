"""Domain errors. The gRPC layer maps each class to one status code, in one place (backend.py)."""


class FaceServiceError(Exception):
    """Base class: the message is safe to show to the caller."""


class InvalidInputError(FaceServiceError):
    """The caller sent something it must fix (INVALID_ARGUMENT)."""


class NoFaceError(FaceServiceError):
    """No face was found in the named image (NOT_FOUND)."""


class IdentityMismatchError(FaceServiceError):
    """The request names a model other than the loaded one (NOT_FOUND)."""


class PreconditionError(FaceServiceError):
    """The loaded model cannot do what was asked, or none is loaded (FAILED_PRECONDITION)."""


class ModelFileError(FaceServiceError):
    """A configured model file is missing, corrupt or of the wrong kind (LoadModel fails)."""


class ModelOptionError(FaceServiceError):
    """A LoadModel option is unknown or malformed (LoadModel fails)."""


class CallEndedError(FaceServiceError):
    """The caller cancelled or its deadline passed; the request stopped between stages."""

    def __init__(self, message: str, deadline_exceeded: bool):
        super().__init__(message)
        self.deadline_exceeded = deadline_exceeded
