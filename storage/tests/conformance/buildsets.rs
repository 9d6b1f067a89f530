//! Builders, sourcestamps and buildsets.

use super::*;

// ---- builders, sourcestamps, buildsets ----

pub async fn builders_are_created_once_and_found_by_name(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.builder_ensure("compile", Some("compiles")).await?;
    let again = s.builder_ensure("compile", None).await?;
    ensure!(a == again, "ensuring an existing builder returns its id");
    let found = s
        .builder_get_by_name("compile")
        .await?
        .ok_or_else(|| anyhow!("builder not found"))?;
    ensure!(
        found.description.as_deref() == Some("compiles"),
        "a missing description keeps the old one"
    );
    ensure!(s.builder_get_by_name("nope").await?.is_none());
    s.builder_ensure("alpha", None).await?;
    let names: Vec<String> = s
        .builder_list()
        .await?
        .into_iter()
        .map(|b| b.name)
        .collect();
    ensure!(
        names == ["alpha", "compile"],
        "builders list by name: {names:?}"
    );
    Ok(())
}

pub async fn identical_sourcestamps_are_stored_once(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?;
    let same = stamp("https://git/x", "main", "abc");
    let other = stamp("https://git/x", "main", "def");
    let (one, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![same.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    let (two, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![other.clone(), same.clone(), same.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    let ids_one = s.buildset_sourcestamp_ids(one).await?;
    let ids_two = s.buildset_sourcestamp_ids(two).await?;
    ensure!(
        ids_one.len() == 1 && ids_two.len() == 2,
        "{ids_one:?} {ids_two:?}"
    );
    ensure!(
        ids_two.contains(&ids_one[0]),
        "the identical stamp is shared"
    );
    let mut expected = vec![same, other];
    expected.sort();
    ensure!(s.buildset_sourcestamps(two).await? == expected);
    // A stamp without branch or revision keeps them absent.
    let bare = SourceStamp {
        repository: "r".into(),
        ..SourceStamp::default()
    };
    let (three, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            sourcestamps: vec![bare.clone()],
            ..NewBuildset::default()
        },
    )
    .await?;
    ensure!(s.buildset_sourcestamps(three).await? == vec![bare]);
    Ok(())
}

pub async fn adding_a_buildset_creates_one_request_per_builder(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let added = s
        .buildset_add(&NewBuildset {
            reason: "push".into(),
            external_idstring: Some("ext-1".into()),
            builder_ids: b.clone(),
            priority: 5,
            waited_for: true,
            submitted_at: at(1),
            ..NewBuildset::default()
        })
        .await?;
    ensure!(
        added.requests.keys().copied().collect::<Vec<_>>() == b,
        "one request per builder"
    );
    let bs = s.buildset_get(added.buildset_id).await?;
    ensure!(bs.reason == "push" && bs.external_idstring.as_deref() == Some("ext-1"));
    ensure!(
        !bs.complete
            && bs.results.is_none()
            && bs.complete_at.is_none()
            && bs.submitted_at == at(1)
    );
    for (builder, request) in &added.requests {
        let r = s.request_get(*request).await?;
        ensure!(r.builder_id == *builder && r.buildset_id == added.buildset_id);
        ensure!(
            r.priority == 5
                && r.waited_for
                && !r.complete
                && r.claimed_by.is_none()
                && r.submitted_at == at(1)
        );
    }
    Ok(())
}

pub async fn a_buildset_with_an_unknown_builder_writes_nothing(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let mut b = builders(s, &["a"]).await?;
    b.push(BuilderId(9_999));
    let err = s
        .buildset_add(&NewBuildset {
            builder_ids: b,
            sourcestamps: vec![stamp("r", "m", "1")],
            ..NewBuildset::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("an unknown builder was accepted"))?;
    ensure!(matches!(err, StorageError::UnknownBuilder(_)), "{err}");
    ensure!(
        s.buildset_list(&BuildsetFilter::default())
            .await?
            .is_empty(),
        "no buildset was written"
    );
    ensure!(
        s.request_list(&RequestFilter::default()).await?.is_empty(),
        "no request was written"
    );
    Ok(())
}

pub async fn a_buildset_without_builders_completes_at_once(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let (id, requests) = buildset(s, &[], at(3)).await?;
    ensure!(requests.is_empty());
    let bs = s.buildset_get(id).await?;
    ensure!(
        bs.complete && bs.results == Some(ResultCode::Success) && bs.complete_at == Some(at(3)),
        "{bs:?}"
    );
    Ok(())
}

pub async fn buildset_properties_keep_their_values_and_sources(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let mut properties = BTreeMap::new();
    properties.insert("n".to_string(), Property::new(json!(3), "submit"));
    properties.insert(
        "deep".to_string(),
        Property::new(json!({"a": [1, null, "x"]}), "scheduler"),
    );
    let (id, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            properties: properties.clone(),
            ..NewBuildset::default()
        },
    )
    .await?;
    ensure!(s.buildset_properties(id).await? == properties);
    Ok(())
}

pub async fn buildsets_list_newest_first_with_filters(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (first, _) = buildset(s, &b, at(1)).await?;
    let (second, _) = buildset(s, &[], at(2)).await?;
    let (third, _) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b,
            external_idstring: Some("x".into()),
            ..NewBuildset::default()
        },
    )
    .await?;
    let all: Vec<BuildsetId> = s
        .buildset_list(&BuildsetFilter::default())
        .await?
        .iter()
        .map(|b| b.id)
        .collect();
    ensure!(all == [third, second, first], "{all:?}");
    let complete: Vec<BuildsetId> = s
        .buildset_list(&BuildsetFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?
        .iter()
        .map(|b| b.id)
        .collect();
    ensure!(complete == [second]);
    let ext = s
        .buildset_list(&BuildsetFilter {
            external_idstring: Some("x".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ext.len() == 1 && ext[0].id == third);
    let page = s
        .buildset_list(&BuildsetFilter {
            limit: Some(1),
            offset: Some(1),
            ..Default::default()
        })
        .await?;
    ensure!(page.len() == 1 && page[0].id == second);
    Ok(())
}

pub async fn stored_sourcestamps_read_by_page_and_by_id(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    for rev in ["r1", "r2", "r3", "r1"] {
        buildset_with(
            s,
            NewBuildset {
                builder_ids: b.clone(),
                sourcestamps: vec![stamp("https://git/x", "main", rev)],
                ..NewBuildset::default()
            },
        )
        .await?;
    }
    let (first, total) = s.sourcestamp_page(2, 0).await?;
    ensure!(total == 3 && first.len() == 2, "{first:?} of {total}");
    let (rest, _) = s.sourcestamp_page(2, 2).await?;
    ensure!(rest.len() == 1 && rest[0].0 > first[1].0);
    let revisions: Vec<_> = first
        .iter()
        .chain(&rest)
        .map(|(_, st)| st.revision.clone().unwrap_or_default())
        .collect();
    ensure!(revisions == ["r1", "r2", "r3"], "{revisions:?}");
    ensure!(s.sourcestamp_get(first[0].0).await? == first[0].1);
    ensure!(matches!(
        s.sourcestamp_get(kiln_model::SourceStampId(999_999)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}
