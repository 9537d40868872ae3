"""How jobs leave this process: command builders for external servers (vLLM, TEI)."""
