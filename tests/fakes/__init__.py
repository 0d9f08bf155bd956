"""Local stand-ins for what lies outside the machine (LLM providers), served over HTTP."""
