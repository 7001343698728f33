"""The demo's method sections: one module per method, `<method>_section(ctx: DemoContext) -> SectionResult`, that
runs the method on the toy world and measures it with the base evaluation's seeds. Each method's record in
`diffalign.methods.METHODS` names its section; the demo, its report and the acceptance scripts iterate over them.
`toy_training` holds what the training sections share."""
