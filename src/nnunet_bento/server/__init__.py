"""The HTTP door: BentoML services, routes, request guards and error bodies."""
