"""The admin's pages, one module per noun; each only calls the stores or the operations layer."""
