"""The store role (issue 15) on SQLite: the host's four Stores RPCs over real gRPC, the role
guard (and a face load beside a store load, RolesTest), a corrupt or foreign store file, and an
acknowledged StoresSet surviving `kill -9`.

StoreSemantics holds the RPC tests; tests/test_store_postgres.py runs them on Postgres."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
import types
import unittest

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend_pb2
from engines.options import DEFAULT_STORE_FILE
from harness.servers import BackendProcess
from roles import Roles
from store.base import key_digest
from store.index import MatrixIndex, quantise
from store.sqlite import SQLiteStore
from tests import support
from tests.support import CALL_TIMEOUT, GrpcAssertions

DIM = 8
STORE_NAME = "face-gallery"


def keys(rows) -> list[backend_pb2.StoresKey]:
    return [backend_pb2.StoresKey(Floats=list(map(float, row))) for row in rows]


def values(*items: bytes) -> list[backend_pb2.StoresValue]:
    return [backend_pb2.StoresValue(Bytes=v) for v in items]


def random_keys(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class StoreSemantics(GrpcAssertions):
    """The host's semantics, over gRPC, for any store; a test case provides `running` and
    `store_options()`, the LoadModel options of an empty store for each test."""

    def store_options(self) -> list[str]:
        raise NotImplementedError

    def load(self, options: list[str] | None = None, model_path: str = "", name: str = STORE_NAME):
        return self.stub.LoadModel(
            backend_pb2.ModelOptions(
                Model=name, ModelPath=model_path, Options=self.store_options() if options is None else options
            ),
            timeout=CALL_TIMEOUT,
        )

    def setUp(self) -> None:
        result = self.load()
        self.assertTrue(result.success, result.message)

    def set(self, rows, *items: bytes):
        return self.stub.StoresSet(
            backend_pb2.StoresSetOptions(Keys=keys(rows), Values=values(*items)), timeout=CALL_TIMEOUT
        )

    def get(self, rows):
        return self.stub.StoresGet(backend_pb2.StoresGetOptions(Keys=keys(rows)), timeout=CALL_TIMEOUT)

    def delete(self, rows):
        return self.stub.StoresDelete(backend_pb2.StoresDeleteOptions(Keys=keys(rows)), timeout=CALL_TIMEOUT)

    def find(self, row, top_k: int):
        return self.stub.StoresFind(
            backend_pb2.StoresFindOptions(Key=backend_pb2.StoresKey(Floats=list(map(float, row))), TopK=top_k),
            timeout=CALL_TIMEOUT,
        )

    def test_set_upserts_and_get_matches_exact_keys(self):
        rows = random_keys(3)
        self.assertTrue(self.set(rows, b"a", b"b", b"c").success)
        self.assertTrue(self.set(rows[1:2], b"B").success)  # same key: replaces the value
        got = self.get([rows[2], rows[1], rows[0]])
        self.assertEqual([v.Bytes for v in got.Values], [b"c", b"B", b"a"])
        for returned, wanted in zip(got.Keys, [rows[2], rows[1], rows[0]]):
            self.assertEqual(np.array(returned.Floats, dtype=np.float32).tobytes(), wanted.tobytes())
        near = rows[0].copy()
        near[0] = np.nextafter(near[0], np.float32(np.inf))  # one ulp away is another key
        missing = self.get([near, random_keys(1, seed=9)[0]])
        self.assertEqual((len(missing.Keys), len(missing.Values)), (0, 0))
        self.assertEqual(len(self.find(rows[0], 10).Keys), 3)  # the upsert added nothing

    def test_delete_removes_exact_keys_only(self):
        rows = random_keys(3)
        self.set(rows, b"a", b"b", b"c")
        self.assertTrue(self.delete([rows[1], random_keys(1, seed=7)[0]]).success)  # a missing key is no error
        self.assertEqual([v.Bytes for v in self.get(rows).Values], [b"a", b"c"])
        found = self.find(rows[0], 10)
        self.assertEqual(sorted(v.Bytes for v in found.Values), [b"a", b"c"])
        # Find's keys are the stored keys bit for bit: deleting with them empties the store.
        self.delete([np.array(k.Floats, dtype=np.float32) for k in found.Keys])
        self.assertEqual(len(self.find(rows[0], 10).Keys), 0)

    def test_find_answers_top_k_by_cosine_best_first(self):
        rows = random_keys(50, seed=1)
        self.set(rows, *[str(i).encode() for i in range(50)])
        query = rows[17] * 3.0 + random_keys(1, seed=2)[0] * 0.1  # not unit: cosine, not dot
        expected = sorted(range(50), key=lambda i: -cosine(rows[i], query))
        found = self.find(query, 5)
        self.assertEqual([int(v.Bytes) for v in found.Values], expected[:5])
        self.assertEqual(found.Values[0].Bytes, b"17")
        for sim, i in zip(found.Similarities, expected):
            self.assertAlmostEqual(sim, cosine(rows[i], query), places=5)
        self.assertEqual(list(found.Similarities), sorted(found.Similarities, reverse=True))
        self.assertEqual(len(self.find(query, 500).Keys), 50)  # TopK beyond the count: all of them

    def test_keys_of_another_dimension_are_invalid_argument(self):
        self.set(random_keys(2), b"a", b"b")
        other = random_keys(1, dim=DIM + 1)
        for label, call in [
            ("Set", lambda: self.set(other, b"x")),
            ("Get", lambda: self.get(other)),
            ("Delete", lambda: self.delete(other)),
            ("Find", lambda: self.find(other[0], 1)),
        ]:
            self.assert_status(
                call, grpc.StatusCode.INVALID_ARGUMENT, f"{DIM + 1} floats", str(DIM),
                label=label, reason="KEY_DIMENSION_MISMATCH", field=None,
            )  # fmt: skip
        # An emptied store takes another length, as the host's does.
        self.delete(random_keys(2))
        self.assertTrue(self.set(other, b"x").success)

    def test_bad_keys_and_requests_are_invalid_argument(self):
        nan = random_keys(1)
        nan[0, 3] = np.nan
        inf = random_keys(1)
        inf[0, 0] = np.inf
        cases = [
            ("empty key", lambda: self.set([[]], b"x"), "KEY_INVALID"),
            ("NaN", lambda: self.set(nan, b"x"), "KEY_INVALID"),
            ("infinity", lambda: self.find(inf[0], 1), "KEY_INVALID"),
            ("no keys", lambda: self.set([], *()), "BAD_STORE_REQUEST"),
            ("values count", lambda: self.set(random_keys(2), b"x"), "BAD_STORE_REQUEST"),
            ("mixed lengths", lambda: self.set([[1.0, 2.0], [1.0]], b"x", b"y"), "KEY_DIMENSION_MISMATCH"),
            ("TopK 0", lambda: self.find(random_keys(1)[0], 0), "BAD_STORE_REQUEST"),
        ]
        for label, call, reason in cases:
            with self.subTest(label):
                self.assert_status(call, grpc.StatusCode.INVALID_ARGUMENT, label=label, reason=reason, field=None)
        self.assertEqual(len(self.find(random_keys(1)[0], 5).Keys), 0)  # nothing was written

    def test_empty_store_answers_empty(self):
        self.assertEqual(len(self.get(random_keys(1)).Keys), 0)
        self.assertEqual(len(self.find(random_keys(1)[0], 3).Keys), 0)
        self.assertTrue(self.delete(random_keys(1)).success)

    def test_reload_serves_everything_stored(self):
        rows = random_keys(20, seed=4)
        self.set(rows, *[bytes([i]) for i in range(20)])
        self.delete(rows[:5])
        result = self.load()  # a new store object on the same data: everything is read back
        self.assertTrue(result.success, result.message)
        self.assertIn("15 keys", result.message)
        self.assertEqual([v.Bytes for v in self.get(rows).Values], [bytes([i]) for i in range(5, 20)])
        self.assertEqual(self.find(rows[7], 1).Values[0].Bytes, bytes([7]))


class SQLiteStoreGrpcTest(StoreSemantics, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.serve()

    def setUp(self) -> None:
        self.directory = support.temp_dir(self)
        super().setUp()

    def store_options(self) -> list[str]:
        return ["store:sqlite", f"store_path:{os.path.join(self.directory, 'gallery.sqlite')}"]

    def test_default_file_is_in_model_path(self):
        result = self.load(["store:sqlite"], model_path=self.directory)
        self.assertTrue(result.success, result.message)
        self.set(random_keys(1), b"x")
        self.assertTrue(os.path.isfile(os.path.join(self.directory, DEFAULT_STORE_FILE)))
        self.assertIn(DEFAULT_STORE_FILE, result.message)

    def test_status_health_and_identity_guard(self):
        self.assert_serving("store loaded")
        status = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
        self.assertEqual((status.state, status.model), (backend_pb2.StatusResponse.READY, STORE_NAME))
        self.assertIn("sqlite store", status.model_description)
        self.assert_status(
            lambda: self.stub.StoresFind(
                backend_pb2.StoresFindOptions(Key=keys(random_keys(1))[0], TopK=1, ModelIdentity="other-gallery"),
                timeout=CALL_TIMEOUT,
            ),
            grpc.StatusCode.NOT_FOUND,
            "model identity mismatch: loaded 'face-gallery', requested 'other-gallery'",
            reason="IDENTITY_MISMATCH",
            field="ModelIdentity",
            clean=False,
        )

    def test_face_rpcs_on_a_store_are_failed_precondition(self):
        calls = {
            "FaceVerify": lambda: self.stub.FaceVerify(
                backend_pb2.FaceVerifyRequest(img1="x", img2="y"), timeout=CALL_TIMEOUT
            ),
            "Embedding": lambda: self.stub.Embedding(backend_pb2.PredictOptions(Images=["x"]), timeout=CALL_TIMEOUT),
            "Detect": lambda: self.stub.Detect(backend_pb2.DetectOptions(src="x"), timeout=CALL_TIMEOUT),
            "FaceAnalyze": lambda: self.stub.FaceAnalyze(backend_pb2.FaceAnalyzeRequest(img="x"), timeout=CALL_TIMEOUT),
        }
        for name, call in calls.items():
            with self.subTest(name):
                self.assert_status(
                    call, grpc.StatusCode.FAILED_PRECONDITION, "is a store", reason="LOADED_MODEL_IS_STORE", field=""
                )

    def test_stores_rpcs_on_a_face_model_are_failed_precondition(self):
        name, options = support.engine_setup(support.ENGINE_INSIGHTFACE)
        result = self.stub.LoadModel(
            backend_pb2.ModelOptions(Model=name, ModelPath=support.MODELS_DIR, Options=options), timeout=CALL_TIMEOUT
        )
        self.assertTrue(result.success, result.message)
        self.assert_status(
            lambda: self.set(random_keys(1), b"x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not a store",
            "store:sqlite",
            reason="LOADED_MODEL_IS_NOT_STORE",
            field="",
        )
        # and back: loading a store frees the face model
        self.assertTrue(self.load().success)
        self.assertTrue(self.set(random_keys(1), b"x").success)
        self.assertEqual(self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT).model, STORE_NAME)

    def test_a_failed_store_load_leaves_the_store_serving(self):
        self.set(random_keys(1), b"kept")
        result = self.load(["store:sqlite", f"store_path:{os.path.join(self.directory, 'no', 'such', 'dir.db')}"])
        self.assertFalse(result.success)
        self.assertIn("directory does not exist", result.message)
        self.assertEqual([v.Bytes for v in self.get(random_keys(1)).Values], [b"kept"])
        bad = self.load(["store:mysql"])
        self.assertFalse(bad.success)
        self.assertIn("store must be one of sqlite, postgres", bad.message)


class StoreAuthTest(GrpcAssertions, unittest.TestCase):
    TOKEN = "store-secret"

    @classmethod
    def setUpClass(cls):
        cls.serve(token=cls.TOKEN)

    def test_stores_rpcs_need_the_token(self):
        directory = support.temp_dir(self)
        path = f"store_path:{os.path.join(directory, 's.sqlite')}"
        metadata = (("authorization", f"Bearer {self.TOKEN}"),)
        result = self.stub.LoadModel(
            backend_pb2.ModelOptions(Options=["store:sqlite", path]), timeout=CALL_TIMEOUT, metadata=metadata
        )
        self.assertTrue(result.success, result.message)
        request = backend_pb2.StoresFindOptions(Key=keys(random_keys(1))[0], TopK=1)
        self.call_metadata = metadata  # Health, inside assert_status, with the token
        self.assert_status(
            lambda: self.stub.StoresFind(request, timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNAUTHENTICATED,
            reason="BAD_TOKEN",
            field="authorization",
        )
        self.stub.StoresFind(request, timeout=CALL_TIMEOUT, metadata=metadata)


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class StoreFileTest(unittest.TestCase):
    """What LoadModel finds at store_path: anything not this store's fails the load, untouched."""

    def setUp(self) -> None:
        self.directory = support.temp_dir(self)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def assert_refused(self, path: str, *fragments: str) -> None:
        from core.errors import ModelFileError

        before = file_digest(path)
        with self.assertRaises(ModelFileError) as caught:
            SQLiteStore(path)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))
        self.assertIn("left as it is", str(caught.exception))
        self.assertEqual(file_digest(path), before, "the refused file was changed")
        self.assertEqual(sorted(os.listdir(self.directory)), sorted([os.path.basename(path)]), "files were added")

    def test_a_file_of_another_kind_is_refused(self):
        path = self.path("notes.txt")
        with open(path, "wb") as f:
            f.write(b"my holiday notes\n" * 100)
        self.assert_refused(path, "not a SQLite database")

    def test_another_applications_database_is_refused(self):
        path = self.path("app.db")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
        conn.commit()
        conn.close()
        self.assert_refused(path, "another application")

    def test_a_corrupt_store_is_refused(self):
        path = self.path("gallery.sqlite")
        store = SQLiteStore(path)
        store.set(random_keys(2000, dim=512), [b"v%d" % i for i in range(2000)])
        store.close()
        with open(path, "r+b") as f:  # keep the header and the first page (meta), wreck the rest
            f.seek(8192)
            f.write(os.urandom(os.path.getsize(path) - 8192 - 4096))
        self.assert_refused(path, "corrupt")

    def test_new_store_is_wal_with_full_sync(self):
        store = SQLiteStore(self.path("gallery.sqlite"))
        self.addCleanup(store.close)
        conn = store._conn
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL: fsync at every commit


def reference_find(index: MatrixIndex, query: np.ndarray, top_k: int) -> list[tuple[bytes, bytes, float]]:
    """The plain exact search Find must equal: every row scored, best first, ties in row order."""
    used = len(index)
    scores = index.exact_similarities(np.arange(used), query)
    best = np.lexsort((np.arange(used), -scores))[:top_k]
    return [(index._matrix[r].tobytes(), index._values[r], float(np.clip(scores[r], -1.0, 1.0))) for r in best]


def found(index: MatrixIndex, query: np.ndarray, top_k: int) -> list[tuple[bytes, bytes, float]]:
    return [(key.tobytes(), value, similarity) for key, value, similarity in index.find(query, top_k)]


@st.composite
def galleries(draw: st.DrawFn) -> tuple[np.ndarray, list[int], np.ndarray, int]:
    """Keys built to defeat a quantised first pass: copies, scaled copies (equal cosines), keys a
    float32 step apart, zero keys, one-hot keys and keys of very different magnitudes; rows to
    delete, a query (maybe a stored key or zero) and a K."""
    dim = draw(st.sampled_from([3, 16, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((draw(st.integers(1, 40)), dim)).astype(np.float32)
    parts = [base]
    kinds = st.sampled_from(["copy", "scaled", "ulp", "zero", "onehot", "huge", "tiny"])
    for kind in draw(st.lists(kinds, max_size=6)):
        pick = base[rng.integers(len(base), size=draw(st.integers(1, 30)))]
        if kind == "copy":
            parts.append(pick.copy())
        elif kind == "scaled":
            parts.append(pick * np.float32(rng.choice([0.5, 2.0, 3.0, 1e-3, 1e3])))
        elif kind == "ulp":
            parts.append(np.nextafter(pick, np.float32(np.inf) * np.sign(rng.standard_normal(pick.shape))))
        elif kind == "zero":
            parts.append(np.zeros((1, dim), np.float32))
        elif kind == "onehot":
            parts.append(np.eye(dim, dtype=np.float32)[: len(pick)] * np.float32(rng.choice([1.0, -7.0])))
        elif kind == "huge":
            parts.append(pick * np.float32(1e36))
        else:
            parts.append(pick * np.float32(1e-30))
    rows = np.concatenate(parts)
    deletes = draw(st.lists(st.integers(0, len(rows) - 1), max_size=len(rows) // 2))
    which = draw(st.sampled_from(["stored", "near", "random", "zero"]))
    if which == "stored":
        query = rows[rng.integers(len(rows))].copy()
    elif which == "near":
        query = rows[rng.integers(len(rows))] + np.float32(1e-4) * rng.standard_normal(dim).astype(np.float32)
    elif which == "random":
        query = rng.standard_normal(dim).astype(np.float32)
    else:
        query = np.zeros(dim, np.float32)
    return rows, deletes, query.astype(np.float32), draw(st.integers(1, 12))


class MatrixIndexTest(unittest.TestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(galleries())
    def test_find_equals_the_plain_exact_search(self, gallery):
        rows, deletes, query, top_k = gallery
        index = MatrixIndex()
        digests = [key_digest(r) for r in rows]
        # in two upserts (the second replaces equal keys' values), then deletes that move rows
        half = len(rows) // 2
        for part in (slice(0, half), slice(half, None)):
            unique = {d: i for i, d in enumerate(digests[part], start=part.start or 0)}
            index.upsert(rows[list(unique.values())], list(unique), [b"%d" % i for i in unique.values()])
        index.delete([digests[i] for i in deletes])
        self.assertEqual(found(index, query, top_k), reference_find(index, query, top_k))

    def test_find_is_exact_after_a_load_upserts_and_deletes(self):
        rng = np.random.default_rng(3)
        index = MatrixIndex(parts=2)
        first = random_keys(70000, dim=32, seed=4)  # past SPLIT_ROWS: the first pass runs in two threads
        index.replace_all(first, [key_digest(r) for r in first], [b"load-%d" % i for i in range(len(first))])
        for step in range(20):
            rows = rng.standard_normal((150, 32)).astype(np.float32)
            rows[:10] = first[rng.integers(len(first), size=10)] * np.float32(2.0)  # equal cosines
            index.upsert(rows, [key_digest(r) for r in rows], [b"%d-%d" % (step, i) for i in range(150)])
            index.delete([key_digest(r) for r in first[rng.integers(len(first), size=40)]])
        for _ in range(5):
            query = first[rng.integers(len(first))] + rng.standard_normal(32).astype(np.float32) * 0.3
            self.assertEqual(found(index, query, 10), reference_find(index, query, 10))

    def test_the_first_pass_leaves_few_rows_to_score_exactly(self):
        # A bound too loose would still be exact (every row rescored) but as slow as no first pass.
        rows = random_keys(20000, dim=512, seed=5)
        index = MatrixIndex()
        index.replace_all(rows, [key_digest(r) for r in rows], [b""] * len(rows))
        codes, scales, residuals, _ = quantise(rows[7:8] + np.float32(0.1))
        self.assertLess(len(index._candidates(codes, scales[0], residuals[0], 5)), 200)

    def test_quantisation_error_is_within_the_bound(self):
        # Every row's first-pass cosine is within residual_row * (1 + residual_query) +
        # residual_query of its exact cosine, in exact integer arithmetic.
        rng = np.random.default_rng(6)
        rows = np.concatenate(
            [
                random_keys(3000, dim=512, seed=6),
                np.eye(512, dtype=np.float32)[:50] * np.float32(-3.0),
                random_keys(50, dim=512, seed=7) * np.float32(1e37),
                random_keys(50, dim=512, seed=8) * np.float32(1e-35),
                np.abs(random_keys(50, dim=512, seed=9)),
            ]
        )
        codes, scales, residuals, norms = quantise(rows)
        for query in (rows[5], rows[3010], rng.standard_normal(512).astype(np.float32), rows[3199]):
            query_codes, query_scales, query_residuals, _ = quantise(query.reshape(1, -1))
            approx = (codes.astype(np.int64) @ query_codes[0].astype(np.int64)) * scales * query_scales[0]
            wide = query.astype(np.float64)
            exact = (rows.astype(np.float64) @ wide) / norms / np.linalg.norm(wide)
            bound = residuals.astype(np.float64) * (1 + query_residuals[0]) + query_residuals[0]
            self.assertTrue(np.all(np.abs(approx - exact) <= bound + 1e-6), np.max(np.abs(approx - exact) - bound))

    def test_first_pass_kernel_is_exact_at_the_code_extremes(self):
        index = MatrixIndex(parts=2)
        rng = np.random.default_rng(10)
        codes = rng.integers(-127, 128, size=(70000, 512)).astype(np.int8)
        codes[:4] = 127
        codes[1, ::2] = -127
        codes[2] = -127
        index._codes, index._digests = codes, [b""] * len(codes)
        for query in (np.full(512, 127, np.int8), np.full(512, -127, np.int8), codes[9]):
            want = codes.astype(np.int64) @ query.astype(np.int64)
            np.testing.assert_array_equal(index._dots(query.reshape(1, -1), len(codes)), want.astype(np.float32))

    def test_similarities_are_the_float64_cosine(self):
        rows = random_keys(300, dim=64, seed=11)
        index = MatrixIndex()
        index.upsert(rows, [key_digest(r) for r in rows], [b""] * len(rows))
        query = random_keys(1, dim=64, seed=12)[0]
        want = [cosine(r.astype(np.float64), query.astype(np.float64)) for r in rows]
        np.testing.assert_allclose(index.exact_similarities(np.arange(len(rows)), query), want, rtol=0, atol=1e-14)

    def test_zero_key_has_similarity_zero(self):
        index = MatrixIndex()
        rows = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
        index.upsert(rows, [key_digest(r) for r in rows], [b"zero", b"x"])
        self.assertEqual(
            [(v, s) for _, v, s in index.find(np.array([1.0, 0.0], np.float32), 2)], [(b"x", 1.0), (b"zero", 0.0)]
        )


class FakeRole:
    """One role of roles.Roles: `load` marks it loaded and `free` unloads it; `during_free` runs
    at the start of each free (the moment another LoadModel could slip in)."""

    def __init__(self, name: str) -> None:
        self.name, self.loaded, self.on_change = name, None, None
        self.during_free = lambda: None

    def load(self, request):
        self.loaded = types.SimpleNamespace(describe=lambda: self.name)
        return self.loaded

    def free(self) -> None:
        self.during_free()
        self.loaded = None


class RolesTest(unittest.TestCase):
    def test_a_face_load_and_a_store_load_side_by_side_leave_one_role_loaded(self):
        faces, stores = FakeRole("faces"), FakeRole("stores")
        roles = Roles(faces, stores)
        face_request = types.SimpleNamespace(store=lambda: None)
        store_request = types.SimpleNamespace(store=lambda: "sqlite")
        store_loaded = threading.Event()

        def store_load_in_between() -> None:
            # The face load has loaded its model and is about to free the stores: a store load now.
            stores.during_free = lambda: None
            other = threading.Thread(target=lambda: (roles.load(store_request), store_loaded.set()))
            other.start()
            store_loaded.wait(0.5)  # returns at once without the lock, times out with it

        stores.during_free = store_load_in_between
        roles.load(face_request)
        self.assertTrue(store_loaded.wait(5))
        self.assertTrue(roles.loaded, "a face load and a store load side by side left nothing loaded")
        self.assertEqual((faces.loaded, stores.loaded is not None), (None, True))


class KillDuringSetTest(unittest.TestCase):
    """A client streams StoresSet calls; the backend is `kill -9`ed mid-stream and restarted:
    every acknowledged Set is there, and the Set in flight is all there or not at all."""

    BATCH = 4  # keys per Set: a half-written Set would show as part of a batch

    def test_acknowledged_sets_survive_kill_9(self):
        directory = support.temp_dir(self)
        options = ["store:sqlite", "store_path:gallery.sqlite"]
        acknowledged: list[int] = []
        attempted: list[int] = []
        rows = random_keys(20000 * self.BATCH, dim=128, seed=11)

        def batch(i: int) -> np.ndarray:
            return rows[i * self.BATCH : (i + 1) * self.BATCH]

        with BackendProcess() as server:
            result = server.stub.LoadModel(
                backend_pb2.ModelOptions(Model=STORE_NAME, ModelPath=directory, Options=options), timeout=CALL_TIMEOUT
            )
            self.assertTrue(result.success, result.message)
            enough = threading.Event()

            def stream() -> None:
                for i in range(20000):
                    attempted.append(i)
                    request = backend_pb2.StoresSetOptions(
                        Keys=keys(batch(i)), Values=values(*[b"%d/%d" % (i, j) for j in range(self.BATCH)])
                    )
                    try:
                        server.stub.StoresSet(request, timeout=CALL_TIMEOUT)
                    except grpc.RpcError:
                        return
                    acknowledged.append(i)
                    if len(acknowledged) == 300:
                        enough.set()

            client = threading.Thread(target=stream)
            client.start()
            while client.is_alive() and not enough.wait(0.1):
                pass
            self.assertTrue(enough.is_set(), "the Sets failed before the kill:\n" + server.output()[-2000:])
            os.kill(server.pid, signal.SIGKILL)
            client.join(60)
            self.assertEqual(server.process.wait(10), -signal.SIGKILL)
        in_flight = attempted[-1]
        self.assertNotIn(in_flight, acknowledged, "the client went on after the kill")

        with BackendProcess() as server:
            result = server.stub.LoadModel(
                backend_pb2.ModelOptions(Model=STORE_NAME, ModelPath=directory, Options=options), timeout=CALL_TIMEOUT
            )
            self.assertTrue(result.success, result.message)
            sent = list(attempted)
            got = server.stub.StoresGet(
                backend_pb2.StoresGetOptions(Keys=keys(np.concatenate([batch(i) for i in sent]))),
                timeout=CALL_TIMEOUT,
            )
            present = {bytes(v.Bytes) for v in got.Values}
            for i in acknowledged:
                for j in range(self.BATCH):
                    self.assertIn(b"%d/%d" % (i, j), present, f"acknowledged Set {i} lost")
            last = {b"%d/%d" % (in_flight, j) for j in range(self.BATCH)}
            self.assertIn(len(last & present), (0, self.BATCH), "the Set in flight was half written")
            self.assertEqual(len(present), len(acknowledged) * self.BATCH + len(last & present))
            # and the restarted store finds them
            probe = batch(acknowledged[len(acknowledged) // 2])[0]
            found = server.stub.StoresFind(
                backend_pb2.StoresFindOptions(Key=keys([probe])[0], TopK=1), timeout=CALL_TIMEOUT
            )
            self.assertEqual(found.Keys[0].Floats, keys([probe])[0].Floats)


if __name__ == "__main__":
    unittest.main()
