"""The store role on a real Postgres (issue 15): the host's Stores semantics over gRPC, two
backend replicas in step through LISTEN/NOTIFY, a restarted replica reloading everything, and a
database that is not this store's. The cluster is a throw-away one (harness.postgres)."""

from __future__ import annotations

import time
import unittest

import grpc
import numpy as np

import backend_pb2
from harness import postgres
from harness.servers import BackendProcess, free_port
from tests import support
from tests.support import CALL_TIMEOUT
from tests.test_store import STORE_NAME, StoreSemantics, keys, random_keys, values

SYNC_SECONDS = 1.0  # the bound: a write on one replica visible on another


def start_cluster(owner: type[unittest.TestCase]) -> postgres.PostgresCluster:
    """A cluster for the class's tests, stopped after them; skip (under CI, fail) without Postgres."""
    problem = postgres.missing()
    if problem:
        if support.UNDER_CI:
            raise AssertionError(f"CI=true and {problem}")
        raise unittest.SkipTest(problem)
    cluster = postgres.PostgresCluster()
    owner.addClassCleanup(cluster.stop)
    return cluster


class PostgresStoreGrpcTest(StoreSemantics, unittest.TestCase):
    cluster: postgres.PostgresCluster

    @classmethod
    def setUpClass(cls):
        cls.cluster = start_cluster(cls)
        cls.serve()

    def setUp(self) -> None:
        self.dsn = self.cluster.create_database()
        super().setUp()

    def tearDown(self) -> None:
        self.stub.Free(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)  # closes the store's connections

    def store_options(self) -> list[str]:
        return ["store:postgres", f"store_dsn:{self.dsn}"]

    def test_status_names_the_database_not_the_password(self):
        status = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
        self.assertIn("postgres store 127.0.0.1:", status.model_description)
        self.assertEqual(status.model, STORE_NAME)

    def test_a_database_of_something_else_is_refused_and_left_alone(self):
        import psycopg

        dsn = self.cluster.create_database("other")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE face_store_entries (id int)")
            conn.execute("INSERT INTO face_store_entries VALUES (42)")
        result = self.load(["store:postgres", f"store_dsn:{dsn}"])
        self.assertFalse(result.success)
        self.assertIn("left as they are", result.message)
        with psycopg.connect(dsn) as conn:
            self.assertEqual(conn.execute("SELECT id FROM face_store_entries").fetchall(), [(42,)])
            self.assertIsNone(conn.execute("SELECT to_regclass('face_store_meta')").fetchone()[0])

    def test_an_unreachable_database_fails_load_model(self):
        result = self.load(["store:postgres", f"store_dsn:host=127.0.0.1 port={free_port()} user=x dbname=y"])
        self.assertFalse(result.success)
        self.assertIn("cannot connect", result.message)
        missing = self.load(["store:postgres"])
        self.assertIn("store:postgres needs store_dsn", missing.message)


class TwoReplicasTest(unittest.TestCase):
    """Two backend processes on one database, as replicas behind a load balancer."""

    cluster: postgres.PostgresCluster

    @classmethod
    def setUpClass(cls):
        cls.cluster = start_cluster(cls)

    def replica(self, dsn: str) -> BackendProcess:
        server = BackendProcess()
        self.addCleanup(server.close)
        result = server.stub.LoadModel(
            backend_pb2.ModelOptions(Model=STORE_NAME, Options=["store:postgres", f"store_dsn:{dsn}"]),
            timeout=CALL_TIMEOUT,
        )
        self.assertTrue(result.success, result.message)
        return server

    @staticmethod
    def find(server: BackendProcess, row: np.ndarray) -> list[bytes]:
        found = server.stub.StoresFind(backend_pb2.StoresFindOptions(Key=keys([row])[0], TopK=1), timeout=CALL_TIMEOUT)
        return [v.Bytes for v in found.Values if found.Similarities[0] > 0.9999]

    def until(self, condition, what: str) -> float:
        """Seconds until condition() held; fails past SYNC_SECONDS."""
        started = time.monotonic()
        while not condition():
            elapsed = time.monotonic() - started
            self.assertLess(elapsed, SYNC_SECONDS, f"{what}: not within {SYNC_SECONDS} s")
            time.sleep(0.01)
        return time.monotonic() - started

    def test_a_write_on_one_replica_is_found_on_the_other_within_a_second(self):
        dsn = self.cluster.create_database()
        a, b = self.replica(dsn), self.replica(dsn)
        rows = random_keys(40, dim=512, seed=21)
        a.stub.StoresSet(
            backend_pb2.StoresSetOptions(Keys=keys(rows[:20]), Values=values(*[b"a%d" % i for i in range(20)])),
            timeout=CALL_TIMEOUT,
        )
        self.assertEqual(self.find(a, rows[5]), [b"a5"])  # the writer reads its own write at once
        self.until(lambda: self.find(b, rows[5]) == [b"a5"], "Set on A, Find on B")
        b.stub.StoresSet(
            backend_pb2.StoresSetOptions(Keys=keys(rows[5:6]), Values=values(b"updated")), timeout=CALL_TIMEOUT
        )
        self.until(lambda: self.find(a, rows[5]) == [b"updated"], "upsert on B, Find on A")
        b.stub.StoresDelete(backend_pb2.StoresDeleteOptions(Keys=keys(rows[:10])), timeout=CALL_TIMEOUT)
        self.until(lambda: self.find(a, rows[3]) == [], "Delete on B, Find on A")
        self.assertEqual(self.find(a, rows[12]), [b"a12"])

        # A replica restarted while the other writes reloads everything.
        a.close()
        b.stub.StoresSet(
            backend_pb2.StoresSetOptions(Keys=keys(rows[20:]), Values=values(*[b"b%d" % i for i in range(20, 40)])),
            timeout=CALL_TIMEOUT,
        )
        again = self.replica(dsn)
        got = again.stub.StoresGet(backend_pb2.StoresGetOptions(Keys=keys(rows)), timeout=CALL_TIMEOUT)
        expected = [b"a%d" % i for i in range(10, 20)] + [b"b%d" % i for i in range(20, 40)]
        self.assertEqual([v.Bytes for v in got.Values], expected)

    def test_replicas_agree_on_a_dimension(self):
        dsn = self.cluster.create_database()
        a, b = self.replica(dsn), self.replica(dsn)
        a.stub.StoresSet(
            backend_pb2.StoresSetOptions(Keys=keys(random_keys(1, dim=512)), Values=values(b"x")), timeout=CALL_TIMEOUT
        )
        # Even before B has heard of A's key, the table's key length decides.
        with self.assertRaises(grpc.RpcError) as caught:
            b.stub.StoresSet(
                backend_pb2.StoresSetOptions(Keys=keys(random_keys(1, dim=128)), Values=values(b"y")),
                timeout=CALL_TIMEOUT,
            )
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        support.assert_error_info(self, caught.exception, "KEY_DIMENSION_MISMATCH")


if __name__ == "__main__":
    unittest.main()
