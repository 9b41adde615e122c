"""Which role the process serves: a face model (face_service) or a store (store.service).

LoadModel's options decide: `store:<kind>` loads a store, anything else a face model. One role at
a time: loading one frees the other, but only once the new one has loaded, so a failed LoadModel
leaves the process as it was. A request for the role not loaded is FAILED_PRECONDITION naming the
role that is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from core.errors import PreconditionError
from engines import LoadRequest
from face_service import FaceService
from store import StoreService


class Roles:
    def __init__(self, faces: FaceService, stores: StoreService | None = None) -> None:
        self.faces = faces
        self.stores = StoreService() if stores is None else stores
        # One LoadModel or Free at a time across both roles: a face load and a store load side by
        # side would each free the other's role after loading its own, leaving neither.
        self._lock = threading.Lock()

    def load(self, request: LoadRequest) -> str:
        """Loads what the request names and frees the other role; what was loaded, for LoadModel's message."""
        with self._lock:
            if request.store() is not None:
                store = self.stores.load(request)
                self.faces.free()
                return store.describe()
            model = self.faces.load(request)
            self.stores.free()
            return model.describe()

    def free(self) -> None:
        with self._lock:
            self.faces.free()
            self.stores.free()

    @property
    def loaded(self) -> bool:
        return self.faces.loaded is not None or self.stores.loaded is not None

    def watch(self, on_change: Callable[[bool], None]) -> None:
        """on_change(loaded) now and whenever either role loads or frees."""
        self.faces.on_change = self.stores.on_change = lambda _: on_change(self.loaded)
        on_change(self.loaded)

    def face(self) -> FaceService:
        """The face service, for a face RPC; PreconditionError while a store is loaded."""
        store = self.stores.loaded
        if store is not None:
            raise PreconditionError(
                f"the loaded model '{store.name}' is a store ({store.store.kind}): it answers StoresSet,"
                " StoresGet, StoresDelete and StoresFind; load a face model for face RPCs",
                reason="LOADED_MODEL_IS_STORE",
            )
        return self.faces

    def store(self) -> StoreService:
        """The store service, for a Stores RPC; PreconditionError while a face model is loaded."""
        model = self.faces.loaded
        if model is not None:
            raise PreconditionError(
                f"the loaded model '{model.display_name}' is a face model, not a store: load one with"
                " the option store:sqlite or store:postgres for the Stores RPCs",
                reason="LOADED_MODEL_IS_NOT_STORE",
            )
        return self.stores
