"""CloudEvents: attributes and validation, and their Kafka, HTTP and JSON bindings."""
