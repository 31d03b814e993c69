"""vLLM integration. Importing this package does not import vLLM; the connector module does."""
