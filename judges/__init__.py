"""LLM-as-a-judge and embedding-similarity rewards, their engines, clients and servers."""
