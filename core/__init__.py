"""The floor under the three rooms: settings, the wire protocol, and the pure logic of
placement (worker views, service curves, scoring) and measurement (histograms).

Imports neither Dask nor Tornado nor onnxruntime, so all of it is tested without them;
``router_api`` (the front end), ``scheduler_plugins`` (inside the scheduler) and
``worker_setup`` (inside each worker) import it and never each other.
"""
