//! The [`export!`](crate::export!) macro that turns a plugin type into a component's exports.

/// Exports a plugin type as a Portcullis plugin component.
///
/// ```ignore
/// portcullis_plugin_sdk::export!(MyPlugin: Guardrail);
/// portcullis_plugin_sdk::export!(MyPlugin: Guardrail + Hook);
/// ```
///
/// After the colon comes a non-empty `+`-list of the kinds the type implements: `Guardrail`,
/// `Enricher`, `Router`, `Hook`. Use it once per crate.
///
/// It always exports `lifecycle`: `init` builds the value with [`Plugin::init`](crate::Plugin::init)
/// and keeps it in a `OnceLock` for the life of the instance; every later call gets `&` it. A call
/// arriving before a successful `init` is a gateway bug and traps (with an error in the gateway's
/// log) rather than guess a verdict. Then each listed kind's interface is exported by forwarding
/// to the trait methods.
///
/// On non-wasm targets the macro still type-checks everything but emits no exports, so
/// `cargo test` and `cargo clippy` of a plugin crate work on the build machine.
#[macro_export]
macro_rules! export {
    ($plugin:ty : $first:ident $(+ $kind:ident)* $(,)?) => {
        const _: () = {
            static __PORTCULLIS_PLUGIN: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();

            fn __portcullis_plugin() -> &'static $plugin {
                $crate::__private::instance(&__PORTCULLIS_PLUGIN)
            }

            // Points a missing `impl Plugin` at the author's type rather than at generated code.
            const _: fn() = || {
                fn assert_plugin<T: $crate::Plugin>() {}
                assert_plugin::<$plugin>();
            };

            #[allow(dead_code)]
            struct __PortcullisLifecycle;

            impl $crate::__bindings::lifecycle::exports::portcullis::plugin::lifecycle::Guest
                for __PortcullisLifecycle
            {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(&__PORTCULLIS_PLUGIN, config)
                }
            }

            #[cfg(target_arch = "wasm32")]
            $crate::__bindings::lifecycle::__export_lifecycle_world!(
                __PortcullisLifecycle with_types_in $crate::__bindings::lifecycle
            );

            $crate::__export_kind!($first, $plugin, __portcullis_plugin);
            $( $crate::__export_kind!($kind, $plugin, __portcullis_plugin); )*
        };
    };
    ($($other:tt)*) => {
        ::core::compile_error!(
            "expected `export!(MyPlugin: Guardrail)` or a `+`-list of kinds, \
             e.g. `export!(MyPlugin: Guardrail + Hook)`; kinds are Guardrail, Enricher, Router, Hook"
        );
    };
}

/// One kind's adapter and exports; see [`export!`](crate::export!).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_kind {
    (Guardrail, $plugin:ty, $get:ident) => {
        const _: fn() = || {
            fn assert_kind<T: $crate::Guardrail>() {}
            assert_kind::<$plugin>();
        };

        #[allow(dead_code)]
        struct __PortcullisGuardrail;

        impl $crate::__bindings::guardrail::exports::portcullis::plugin::guardrail::Guest
            for __PortcullisGuardrail
        {
            fn check_request(
                request: &$crate::__bindings::guardrail::portcullis::plugin::types::Request,
            ) -> $crate::RequestVerdict {
                let request = $crate::Request::lent(request);
                <$plugin as $crate::Guardrail>::check_request($get(), &request)
            }

            fn check_response(
                request: &$crate::__bindings::guardrail::portcullis::plugin::types::Request,
                response: $crate::Response,
            ) -> $crate::ResponseVerdict {
                let request = $crate::Request::lent(request);
                <$plugin as $crate::Guardrail>::check_response($get(), &request, &response)
            }

            fn check_stream(
                request: &$crate::__bindings::guardrail::portcullis::plugin::types::Request,
                delta: $crate::StreamDelta,
            ) -> $crate::StreamVerdict {
                let request = $crate::Request::lent(request);
                <$plugin as $crate::Guardrail>::check_stream($get(), &request, &delta)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__bindings::guardrail::__export_guardrail_world!(
            __PortcullisGuardrail with_types_in $crate::__bindings::guardrail
        );
    };
    (Enricher, $plugin:ty, $get:ident) => {
        const _: fn() = || {
            fn assert_kind<T: $crate::Enricher>() {}
            assert_kind::<$plugin>();
        };

        #[allow(dead_code)]
        struct __PortcullisEnricher;

        impl $crate::__bindings::enricher::exports::portcullis::plugin::enricher::Guest
            for __PortcullisEnricher
        {
            fn enrich(
                request: &$crate::__bindings::guardrail::portcullis::plugin::types::Request,
            ) -> $crate::Enrichment {
                let request = $crate::Request::lent(request);
                <$plugin as $crate::Enricher>::enrich($get(), &request)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__bindings::enricher::__export_enricher_world!(
            __PortcullisEnricher with_types_in $crate::__bindings::enricher
        );
    };
    (Router, $plugin:ty, $get:ident) => {
        const _: fn() = || {
            fn assert_kind<T: $crate::Router>() {}
            assert_kind::<$plugin>();
        };

        #[allow(dead_code)]
        struct __PortcullisRouter;

        impl $crate::__bindings::router::exports::portcullis::plugin::router::Guest
            for __PortcullisRouter
        {
            fn choose(
                request: &$crate::__bindings::guardrail::portcullis::plugin::types::Request,
                group: ::std::string::String,
                candidates: ::std::vec::Vec<$crate::Candidate>,
            ) -> ::std::vec::Vec<u32> {
                let request = $crate::Request::lent(request);
                <$plugin as $crate::Router>::choose($get(), &request, &group, &candidates)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__bindings::router::__export_router_world!(
            __PortcullisRouter with_types_in $crate::__bindings::router
        );
    };
    (Hook, $plugin:ty, $get:ident) => {
        const _: fn() = || {
            fn assert_kind<T: $crate::Hook>() {}
            assert_kind::<$plugin>();
        };

        #[allow(dead_code)]
        struct __PortcullisHook;

        impl $crate::__bindings::hook::exports::portcullis::plugin::hook::Guest
            for __PortcullisHook
        {
            fn on_success(event: $crate::CallEvent) {
                <$plugin as $crate::Hook>::on_success($get(), &event)
            }

            fn on_failure(event: $crate::CallEvent) {
                <$plugin as $crate::Hook>::on_failure($get(), &event)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__bindings::hook::__export_hook_world!(
            __PortcullisHook with_types_in $crate::__bindings::hook
        );
    };
    ($other:ident, $plugin:ty, $get:ident) => {
        ::core::compile_error!(::core::concat!(
            "`",
            ::core::stringify!($other),
            "` is not a Portcullis plugin kind; expected Guardrail, Enricher, Router or Hook"
        ));
    };
}
