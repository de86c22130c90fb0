"""An OpenAI-compatible gateway in front of llama.cpp, vLLM and Ollama."""
