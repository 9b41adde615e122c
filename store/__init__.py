"""The store role: the host's vector-store RPCs (StoresSet, StoresGet, StoresDelete, StoresFind)
over a durable database (SQLite embedded, or Postgres shared by replicas) and an in-memory matrix
of every key (store.index)."""

from store.base import Entry, Match, Store
from store.service import LoadedStore, StoreService

__all__ = ["Entry", "LoadedStore", "Match", "Store", "StoreService"]
