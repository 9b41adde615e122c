#!/usr/bin/env python3
"""The unittest entry point: `python test.py [-k pattern]` runs every test under tests/.

Under CI=true a skipped test is a failure: tests skip only when weights are missing, and CI
must prove the real models, not the absence of them.
"""

import os
import sys
import unittest

REPO = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    os.chdir(REPO)
    sys.path.insert(0, REPO)
    loader = unittest.TestLoader()
    if len(sys.argv) > 2 and sys.argv[1] == "-k":
        loader.testNamePatterns = [f"*{p}*" for p in sys.argv[2:]]
    suite = loader.discover(os.path.join(REPO, "tests"), top_level_dir=REPO)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    under_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    # Counted per test method: a method with failing subtests is one failure, however many.
    failed_tests = {
        id(getattr(t, "test_case", t))  # a _SubTest points at its method
        for t in [t for t, _ in result.failures + result.errors] + result.unexpectedSuccesses
    }
    failed = len(failed_tests)
    skipped = len(result.skipped)
    passed = max(0, result.testsRun - failed - skipped)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    if under_ci and skipped:
        print("CI=true: skipped tests count as failures", file=sys.stderr)
        return 1
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
