"""Joint retriever + reader training with an asynchronously refreshed index (REALM / Atlas; issue 17).

A reader LM and a dual-encoder retriever trained in the same steps: the retriever learns from the
current LM (PDist = RA-DIT's LSR against the live LM, or EMDR²) while the reader trains on its
retrieval-augmented inputs; the document index is re-embedded asynchronously and swapped between
steps, by a fixed interval or when the measured staleness crosses a threshold. See docs/joint.md.
"""
