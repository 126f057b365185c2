"""The model layer: reading models in and reshaping their graphs.

`graph` (replaying a Functional graph on fresh inputs), `layers` (finding and freezing layers),
`heads` (cutting a model and attaching a new head), `keras2/` (Keras 2 files Keras 3 rejects: `safety`, `layers`, `config`, `files`) and
`loading` (any supported file or object to one Functional model). Nothing here knows about
compiling or training.
"""
