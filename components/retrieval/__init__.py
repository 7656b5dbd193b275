"""The retrieval database: tokens, chunk DB, embeddings, faiss/BM25 indexes, neighbours, retrievers."""
