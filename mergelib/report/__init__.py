"""What the book and users read: the papers' published numbers as data (``published``),
comparisons of ours against them (``comparisons``), the book's build with its execution
cache (``book``), the notebooks' parameter check (:mod:`.notebook_parameters`) and the
chapters' helpers (:mod:`.book_helpers`).

The top layer below the command line: may import anything in mergelib.
"""
