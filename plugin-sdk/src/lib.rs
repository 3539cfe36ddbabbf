//! The Portcullis plugin SDK. The WIT contract and the export macro arrive with the plugin runtime.
