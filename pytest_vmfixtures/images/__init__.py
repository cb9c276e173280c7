"""Everything about images: recipes, the builders, your own cloud images, the cache.

Nothing here imports pytest or a backend: backends and the pool use images
through :class:`.image.BuiltImage`. The import graph has no loop:
:mod:`.recipe` (the recipe model and the builders' version numbers) and
:mod:`.image` (a built image's description) import nothing else from here;
:mod:`.catalog` reads recipes; :mod:`.builder` builds them with
:mod:`.mmdebstrap` or :mod:`.minimal`, running host programs through
:mod:`.tools`; :mod:`.cache` keeps the results and calls the builder;
:mod:`.byo` prepares a user's own disk image; :mod:`.prune` decides what the
prune command removes.
"""
