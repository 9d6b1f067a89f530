//! Bad input: refused with a typed error, nothing written.

use super::*;

// ---- bad input ----

pub async fn invalid_input_is_refused_with_typed_errors(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    for priority in [kiln_model::MAX_PRIORITY + 1, kiln_model::MIN_PRIORITY - 1] {
        let err = s
            .buildset_add(&NewBuildset {
                builder_ids: b.clone(),
                priority,
                ..Default::default()
            })
            .await;
        ensure!(
            matches!(err, Err(StorageError::Invalid(_))),
            "priority {priority}"
        );
    }
    let twice = s
        .buildset_add(&NewBuildset {
            builder_ids: vec![b[0], b[0]],
            ..Default::default()
        })
        .await;
    ensure!(matches!(twice, Err(StorageError::Invalid(_))));
    let mut properties = BTreeMap::new();
    properties.insert(" ".to_string(), Property::new(json!(1), "x"));
    let bad_name = s
        .buildset_add(&NewBuildset {
            builder_ids: b.clone(),
            properties,
            ..Default::default()
        })
        .await;
    ensure!(matches!(bad_name, Err(StorageError::Invalid(_))));
    ensure!(matches!(
        s.builder_ensure("  ", None).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.master_register("", at(0)).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(
        s.buildset_list(&BuildsetFilter::default())
            .await?
            .is_empty(),
        "nothing half-written"
    );
    Ok(())
}

pub async fn unknown_ids_are_not_found(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let nf =
        |r: std::result::Result<(), StorageError>| matches!(r, Err(StorageError::NotFound { .. }));
    ensure!(nf(s.buildset_get(BuildsetId(9)).await.map(|_| ())));
    ensure!(nf(s.buildset_properties(BuildsetId(9)).await.map(|_| ())));
    ensure!(nf(s.request_get(RequestId(9)).await.map(|_| ())));
    ensure!(nf(s.build_get(BuildId(9)).await.map(|_| ())));
    ensure!(nf(s
        .build_previous_successful(BuildId(9))
        .await
        .map(|_| ())));
    ensure!(nf(s.build_delete(BuildId(9)).await));
    ensure!(nf(s.master_get(MasterId(9)).await.map(|_| ())));
    ensure!(nf(s.builder_get(BuilderId(9)).await.map(|_| ())));
    ensure!(nf(s.master_deactivate(MasterId(9)).await.map(|_| ())));
    Ok(())
}
