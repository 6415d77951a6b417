"""Images per second and latency per backend x form x batch x precision, with reports."""
