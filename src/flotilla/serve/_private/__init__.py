"""Import-path compatibility with `ray.serve._private` for code ported from Ray Serve.

flotilla's own internals live in `flotilla._private`; this package only re-exports the few
names Ray users import from `ray.serve._private`.
"""
