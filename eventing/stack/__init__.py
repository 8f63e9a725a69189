"""The embedded local stack: one module per part, composed by `supervisor`."""
