"""Retrieval at the output and in the input of a frozen LM, for perplexity: kNN-LM
(Khandelwal et al. 2020) and in-context RALM (Ram et al. 2023). See docs/families.md."""
