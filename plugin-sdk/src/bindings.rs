//! The raw wit-bindgen bindings: one world per plugin kind, sharing one set of Rust types.
//!
//! Everything here is an implementation detail of [`crate::export!`]; plugin authors never name it.
//! Each world's exports reach a component only where its export macro is expanded (wit-bindgen's
//! `pub_export_macro` splits the world's custom section), so a guardrail exports no router.

/// The guardrail world. It is generated first because it is the only kind world that reaches every
/// record of `types` (through `request`, `response` and `stream-delta`); the others reuse them.
pub mod guardrail {
    wit_bindgen::generate!({
        world: "guardrail-plugin",
        path: "wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_guardrail_world",
        default_bindings_module: "portcullis_plugin_sdk::__bindings::guardrail",
        additional_derives: [PartialEq],
        generate_unused_types: true,
    });
}

/// The lifecycle world: `init`.
pub mod lifecycle {
    wit_bindgen::generate!({
        world: "lifecycle-plugin",
        path: "wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_lifecycle_world",
        default_bindings_module: "portcullis_plugin_sdk::__bindings::lifecycle",
        additional_derives: [PartialEq],
        with: {
            "portcullis:plugin/host@0.2.0": crate::__bindings::guardrail::portcullis::plugin::host,
        },
    });
}

/// The enricher world.
pub mod enricher {
    wit_bindgen::generate!({
        world: "enricher-plugin",
        path: "wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_enricher_world",
        default_bindings_module: "portcullis_plugin_sdk::__bindings::enricher",
        additional_derives: [PartialEq],
        with: {
            "portcullis:plugin/types@0.2.0": crate::__bindings::guardrail::portcullis::plugin::types,
            "portcullis:plugin/host@0.2.0": crate::__bindings::guardrail::portcullis::plugin::host,
        },
    });
}

/// The router world.
pub mod router {
    wit_bindgen::generate!({
        world: "router-plugin",
        path: "wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        default_bindings_module: "portcullis_plugin_sdk::__bindings::router",
        additional_derives: [PartialEq],
        with: {
            "portcullis:plugin/types@0.2.0": crate::__bindings::guardrail::portcullis::plugin::types,
            "portcullis:plugin/host@0.2.0": crate::__bindings::guardrail::portcullis::plugin::host,
        },
    });
}

/// The hook world.
pub mod hook {
    wit_bindgen::generate!({
        world: "hook-plugin",
        path: "wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_hook_world",
        default_bindings_module: "portcullis_plugin_sdk::__bindings::hook",
        additional_derives: [PartialEq],
        with: {
            "portcullis:plugin/types@0.2.0": crate::__bindings::guardrail::portcullis::plugin::types,
            "portcullis:plugin/host@0.2.0": crate::__bindings::guardrail::portcullis::plugin::host,
        },
    });
}
