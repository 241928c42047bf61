"""One file per method, one class per file; each registers itself with ``@register("name")``.

Every module in this package is imported by :func:`retain.method.methods`, so adding a method needs no change
outside its own file.
"""
