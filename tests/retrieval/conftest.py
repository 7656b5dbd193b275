"""Retrieval tests run stage functions in-process too: keep faiss to one OpenMP thread, as the
1-CPU Ray tasks of the platform do (OpenMP spinning on a shared 2-core machine is slow)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
