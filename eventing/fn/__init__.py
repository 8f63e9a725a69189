"""Running one user function, in process or behind HTTP, and the API functions import."""
